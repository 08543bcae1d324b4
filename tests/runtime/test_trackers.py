"""Trackers (``bpo_jax.runtime.trackers``): the ``tracker`` key's values, a W&B offline run holding a train run's name,
config and metrics, and a clear error before any compute when wandb is missing."""

import glob
import importlib.util
import json
import struct
import sys

import pytest

from bpo_jax.__main__ import main as cli
from bpo_jax.config import ConfigError, load_config
from bpo_jax.runtime.trackers import check_available, resolved
from testing import write_minisum_folder

_BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of (crc32, length, type) records


def wandb_records(path: str):
    """The protobuf ``Record``s of an offline run's ``run-<id>.wandb`` file."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", "not a .wandb file"
    pos, pending = 7, b""  # 7-byte file header: ":W&B", magic, version
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # a block's tail too short for a record header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_tracker_values():
    assert load_config(None, ["tracker=tensorboard,wandb"]).tracker == ("tensorboard", "wandb")
    assert load_config(None, ["tracker=none"]).tracker == ("none",) and resolved(("none",)) == ()
    has_tbx = importlib.util.find_spec("tensorboardX") is not None
    assert load_config().tracker == ("auto",) and resolved(("auto",)) == (("tensorboard",) if has_tbx else ())
    for bad in ("tracker=mlflow", "tracker=none,wandb"):
        with pytest.raises(ConfigError, match="tracker="):
            load_config(None, [bad])


@pytest.mark.slow
def test_missing_wandb_is_a_clear_error_before_any_compute(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an uninstalled package looks like to import
    with pytest.raises(ValueError, match="pip install wandb"):
        check_available(("wandb",))
    assert cli(["train", "tracker=wandb", f"run_dir={tmp_path / 'run'}"]) == 2
    assert "tracker=wandb needs the wandb package, which is not installed: pip install wandb" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed "
                                                                      "(requirements-test.txt has it)")
def test_wandb_offline_run_holds_name_config_and_metrics(tiny_policy_and_rm, tmp_path, monkeypatch):
    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb"), "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(key, value)
    (tmp_path / "wandb").mkdir()
    data = tmp_path / "data"
    data.mkdir()
    write_minisum_folder(data)
    run = tmp_path / "my_run"
    assert cli(["train", f"model={tiny_policy_and_rm[0]}", f"data={data}", f"run_dir={run}", "total_steps=1",
                "num_phases=1", "batch_size=2", "max_new_tokens=4", "eval_max_new_tokens=4", "lora_rank=2",
                "tied_pairs=second", "export_policy=false", "tracker=wandb"]) == 0
    run_id = (run / "wandb_id").read_text().strip()
    files = glob.glob(str(tmp_path / "wandb" / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
    assert len(files) == 1, files
    history, name, config = [], None, {}
    for record in wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            name = record.run.display_name
            config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "history":
            items = record.history.item  # a key with "/" (eval/win_rate) comes as a nested_key
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
    assert name == "my_run" and config["total_steps"] == 1 and config["tracker"] == ["wandb"]
    with open(run / "metrics.jsonl") as f:
        logged = [json.loads(line) for line in f]
    assert [h["step"] for h in history] == [r["step"] for r in logged] == [0, 1, 1]
    assert history[1]["loss"] == pytest.approx(logged[1]["loss"])
    assert history[0]["eval/win_rate"] == pytest.approx(logged[0]["eval/win_rate"])
    assert history[2]["eval/win_rate"] == pytest.approx(logged[2]["eval/win_rate"])


def test_auto_is_tensorboard_when_tensorboardx_is_installed(monkeypatch, tmp_path):
    """With a (stand-in) tensorboardX, the default tracker writes each record's numbers at its step, with the
    run's name and config as text; booleans and ``step`` itself are not scalars."""
    import importlib.machinery
    import types

    calls = []

    class SummaryWriter:
        def __init__(self, logdir):
            calls.append(("open", logdir))

        def add_text(self, tag, text):
            calls.append(("text", tag, text))

        def add_scalar(self, tag, value, step):
            calls.append(("scalar", tag, value, step))

        def flush(self):
            pass

        def close(self):
            calls.append(("close",))

    fake = types.ModuleType("tensorboardX")
    fake.__spec__ = importlib.machinery.ModuleSpec("tensorboardX", None)
    fake.SummaryWriter = SummaryWriter
    monkeypatch.setitem(sys.modules, "tensorboardX", fake)
    from bpo_jax.runtime.trackers import open_trackers

    cfg = load_config(None, [f"run_dir={tmp_path / 'exp1'}", "total_steps=4"])
    trackers = open_trackers(cfg)
    trackers.log({"step": 2, "phase": 1, "loss": 0.5, "final": True, "note": "x"})
    trackers.close()
    assert calls[0] == ("open", str(tmp_path / "exp1" / "tensorboard"))
    assert ("text", "run", "exp1") in calls
    assert any(c[:2] == ("text", "config") and "total_steps: 4" in c[2] for c in calls)
    assert [c for c in calls if c[0] == "scalar"] == [("scalar", "phase", 1.0, 2), ("scalar", "loss", 0.5, 2)]
    assert calls[-1] == ("close",)
