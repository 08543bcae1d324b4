"""Resume and bad input: a resumed run is the run that was started (or a clear refusal), a broken newest
checkpoint falls back to the previous one, and expected errors are one clear line with exit code 2."""

import json
import logging
import os

import numpy as np
import pytest

from bpo_jax.__main__ import main as cli
from bpo_jax.config import TrainConfig
from bpo_jax.data.minisum import encode_prompts
from bpo_jax.data.prompts import ArrayPrompts
from bpo_jax.eval.annotators import FunctionAnnotator
from bpo_jax.models import load_pretrained
from bpo_jax.train import loop
from bpo_jax.train.checkpoint import IncompatibleCheckpoint
from bpo_jax.wiring.tasks import training_run
from testing import write_minisum_folder


@pytest.fixture(scope="module")
def tiny_dir(tiny_policy_and_rm):
    return tiny_policy_and_rm[0]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_minisum_folder(tmp_path_factory.mktemp("resume_data"))


def _args(tiny_dir, data_dir, run, *extra):
    return ["train", f"model={tiny_dir}", f"data={data_dir}", f"run_dir={run}", "total_steps=2", "num_phases=2",
            "batch_size=2", "max_new_tokens=4", "eval_max_new_tokens=4", "lora_rank=2", "export_policy=false",
            "tied_pairs=second", *extra]  # a tiny random model's responses all score ROUGE 0: every pair ties


def _rows(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_resume_refuses_changed_run_settings_and_skips_the_step0_eval(tiny_dir, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(_args(tiny_dir, data_dir, run)) == 0
    first = capsys.readouterr().out
    assert "step 0: win rate" in first
    # T and the LoRA rank define the run: refused before anything is loaded, one line per key, two ways out.
    assert cli(_args(tiny_dir, data_dir, run, "total_steps=4", "lora_rank=4")) == 2
    err = capsys.readouterr().err
    assert "total_steps: 2 -> 4" in err and "lora_rank: 2 -> 4" in err
    assert "Rerun with the original settings" in err and "new run_dir" in err
    # Operational keys may change; the rerun resumes at the end, without a second step-0 evaluation.
    assert cli(_args(tiny_dir, data_dir, run, "checkpoint_every=1")) == 0
    out = capsys.readouterr().out
    assert "step 0: win rate" not in out and "before ->" in out
    assert [r["step"] for r in _rows(run) if "eval/win_rate" in r].count(0) == 1
    # Another test set (eval_size): step 0 is evaluated again on it, so "before -> after" compares like with like.
    assert cli(_args(tiny_dir, data_dir, run, "eval_size=3")) == 0
    assert "step 0: evaluating on 3 test prompts" in capsys.readouterr().out
    step0 = [r for r in _rows(run) if r["step"] == 0 and "eval/win_rate" in r]
    assert len(step0) == 2 and step0[0]["eval/num_prompts"] != 3 and step0[1]["eval/num_prompts"] == 3


@pytest.mark.parametrize("extra, message", [
    (["temperature=0"], "greedy decoding (0) makes them identical"),
    (["top_k=100000"], "top_k=100000 is larger than the model's vocabulary (49152 tokens)"),
    (["eval_size=50"], "eval_size=50 but"),
    (["max_prompt_length=10000"], "more than the model's"),
])
def test_impossible_settings_fail_before_compute(tiny_dir, data_dir, tmp_path, capsys, extra, message):
    assert cli(_args(tiny_dir, data_dir, tmp_path / "run", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_phase_without_a_usable_pair_is_a_settings_error(tiny_dir, data_dir, tmp_path, capsys):
    """The tiny model's responses all tie (ROUGE 0): with tied_pairs=drop no pair is ever kept. That is a setting
    to change (exit 2: the launchers do not restart it), one line, no traceback."""
    assert cli(_args(tiny_dir, data_dir, tmp_path / "run", "tied_pairs=drop")) == 2
    err = capsys.readouterr().err
    assert "scored the two responses of every distinct pair equal in 21 rounds" in err and "tied_pairs=second" in err
    assert "Traceback" not in err and "transient" not in err


def test_missing_model_is_one_line(tmp_path, capsys):
    assert cli(["train", "model=/no/such/model", f"run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model path '/no/such/model' does not exist") and "Traceback" not in err
    with pytest.raises(FileNotFoundError):
        cli(["train", "model=/no/such/model", f"run_dir={tmp_path / 'run'}", "--debug"])


def _loop(tiny_dir, run, **kw):
    model, tok = load_pretrained(tiny_dir)
    texts = [f"Tell me about topic number {i}, briefly." for i in range(12)]
    ids, mask = encode_prompts(tok, texts, 64)
    cfg = TrainConfig(**{**dict(total_steps=4, num_phases=2, batch_size=2, max_new_tokens=6, learning_rate=5e-3,
                                run_dir=str(run), seed=3, checkpoint_every=1), **kw})
    logs = _Messages()
    logger = logging.getLogger("bpo_jax")
    level, logger.level = logger.level, logging.INFO
    logger.addHandler(logs)
    try:
        loop.train(cfg, training_run(model, tok, ArrayPrompts(texts, ids, mask, batch_size=2, seed=3),
                                     FunctionAnnotator(lambda p, r: r.count("e") - 0.01 * len(r)), eos_token_ids=(2,)))
    finally:
        logger.removeHandler(logs)
        logger.setLevel(level)
    return logs.messages


class _Messages(logging.Handler):
    """The messages the ``bpo_jax`` loggers emit, in order."""

    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _losses(run):
    return {r["step"]: r["loss"] for r in _rows(run) if "loss" in r}  # the last record of a step wins


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tiny_dir, tmp_path):
    whole = tmp_path / "whole"
    _loop(tiny_dir, whole)
    newest = whole / "checkpoints" / "4"
    want = _losses(whole)
    for root, _, files in os.walk(newest / "state"):  # a disk-full / killed-copy truncation of the data
        for name in files:
            path = os.path.join(root, name)
            size = os.path.getsize(path)
            if size > 64:
                with open(path, "r+b") as f:
                    f.truncate(size // 3)
    logs = _loop(tiny_dir, whole)
    assert any("checkpoint step 4" in m and "unreadable" in m for m in logs), logs
    assert any("resuming from step 3" in m for m in logs) and "resumed" in logs[-1]
    assert (whole / "checkpoints_broken" / "4").is_dir()  # set aside, never deleted
    got = _losses(whole)
    np.testing.assert_allclose([got[s] for s in range(1, 5)], [want[s] for s in range(1, 5)], rtol=1e-6)


@pytest.mark.slow
def test_changed_lora_shape_through_the_api_is_a_clear_refusal(tiny_dir, tmp_path):
    run = tmp_path / "run"
    _loop(tiny_dir, run, lora_rank=2, total_steps=2)
    with pytest.raises(IncompatibleCheckpoint, match="does not fit this run's shapes"):
        _loop(tiny_dir, run, lora_rank=4, total_steps=2)
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]


@pytest.mark.slow
def test_resume_with_other_base_weights_is_refused(tiny_dir, tmp_path):
    import jax

    run = tmp_path / "run"
    _loop(tiny_dir, run, total_steps=2)
    model, _ = load_pretrained(tiny_dir)
    other = jax.tree.map(lambda x: x * 1.001, model.params)
    from bpo_jax.train import state as st
    from bpo_jax.train.checkpoint import Checkpointer

    cfg = TrainConfig(total_steps=2, num_phases=2, batch_size=2, max_new_tokens=6, run_dir=str(run), seed=3)
    ckpt = Checkpointer(str(run), 3)
    with pytest.raises(IncompatibleCheckpoint, match="different base weights"):
        ckpt.restore_latest(st.create_state(cfg, other, jax.random.key(3)))
    ckpt.restore_latest(st.create_state(cfg, model.params, jax.random.key(3)))  # the same weights resume
    ckpt.close()


_GOOD_ROW = {"id": "r0", "document": "Town 0 opened a park.", "reference": "A park.", "gold": "Town 0 opened a park."}


@pytest.mark.parametrize("yaml_text, message", [
    ("total_steps: four\n", "total_steps='four' is not a valid int"),
    ("total_steps: [4, 8]\n", "total_steps=[4, 8] is not a valid int"),
    ("total_steps: true\n", "total_steps=True is not a valid int"),
    ("beta: .nan\n", "beta must be a finite number > 0"),
    ("beta:\n", "beta=None is not a valid float"),
    ("model: {name: smollm2}\n", "model={'name': 'smollm2'} is not a valid str"),
    ("lora_targets: [q, 3]\n", "lora_targets=['q', 3] is not a list of names"),
    ("lora: {rank: 4}\n", "unknown config key 'lora.rank'"),  # a group's mapping: its keys are checked
    ("lora: {beta: 4}\n", "'lora.beta' in"),  # a key of another group
    ("lorra: {lora_rank: 4}\n", "unknown config key 'lorra'"),
    ("- total_steps: 4\n", "must hold a mapping of keys to values"),
    ("total_steps: 4\n  beta: [\n", "is not valid YAML"),
])
def test_fuzzed_config_files_are_one_clear_line(tmp_path, capsys, yaml_text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    assert cli(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2, err


@pytest.mark.slow
@pytest.mark.parametrize("line, message", [
    (json.dumps({**_GOOD_ROW, "document": ""}), ":2: missing or empty field 'document'"),
    (json.dumps({**_GOOD_ROW, "gold": 42}), ":2: missing or empty field 'gold'"),
    (json.dumps([1, 2]), ":2: expected a JSON object, got list"),
    ('{"id": "r1", "document": ', ":2: not valid JSON"),
    (b'{"id": "r1", "document": "caf\xe9"}', ":2: not UTF-8 text"),
    (json.dumps({**_GOOD_ROW, "document": "word " * 2_000_000}), "exceeds max_prompt_length=256"),
])
def test_fuzzed_data_rows_name_the_file_and_line_and_keep_the_run_dir(tiny_dir, data_dir, tmp_path, capsys, line,
                                                                       message):
    run = tmp_path / "run"
    assert cli(_args(tiny_dir, data_dir, run)) == 0  # an existing run whose files must survive the bad command
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    bad = tmp_path / "bad_data"
    bad.mkdir()
    for split in ("train", "test"):
        raw = line if isinstance(line, bytes) else line.encode()
        (bad / f"{split}.jsonl").write_bytes(json.dumps(_GOOD_ROW).encode() + b"\n" + raw + b"\n")
    capsys.readouterr()
    assert cli(_args(tiny_dir, bad, tmp_path / "run2")) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err[-2000:]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
