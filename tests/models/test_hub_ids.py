"""Hub model ids (``org/name[@revision]``) resolve through the HF cache: the policy, a reward model and the train
command load by id from a cache laid out as huggingface_hub lays it out; an id that is neither a path nor cached
fails with one clear line."""

import json
import shutil

import numpy as np
import pytest

from bpo_jax.__main__ import main as cli
from bpo_jax.models import load_pretrained, load_reward_model
from bpo_jax.models.hub import parse_hub_id, resolve_model
from testing import record_snapshot_download, write_minisum_folder

REV = "0123456789abcdef0123456789abcdef01234567"


def _cache_model(cache, repo_id: str, folder: str, rev: str = REV) -> None:
    """Put ``folder``'s files in ``cache`` as a downloaded snapshot of ``repo_id`` (refs/main → ``rev``)."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, root / "snapshots" / rev)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(rev)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_policy_and_rm):
    """An offline HF cache holding the tiny policy as ``tiny-org/policy`` and the tiny RM as ``tiny-org/rm``."""
    cache = tmp_path / "hf_cache"
    policy, rm = tiny_policy_and_rm
    _cache_model(cache, "tiny-org/policy", policy)
    _cache_model(cache, "tiny-org/rm", rm)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_parse_hub_id():
    assert parse_hub_id("org/name") == ("org/name", None)
    assert parse_hub_id("org/na.me-1@v1.0") == ("org/na.me-1", "v1.0")
    assert parse_hub_id("/abs/path") is None and parse_hub_id("a/b/c") is None and parse_hub_id("x.gguf") is None


def test_policy_and_reward_model_load_by_id(hub_cache, tiny_policy_and_rm):
    policy, rm = tiny_policy_and_rm
    assert resolve_model("tiny-org/policy") == str(hub_cache / "models--tiny-org--policy" / "snapshots" / REV)
    assert resolve_model(f"tiny-org/policy@{REV}").endswith(REV)
    by_id, tok = load_pretrained("tiny-org/policy")
    by_path, _ = load_pretrained(policy)
    assert tok is not None and by_id.config == by_path.config
    np.testing.assert_array_equal(np.asarray(by_id.params["embed"]), np.asarray(by_path.params["embed"]))
    rm_by_id, rm_tok = load_reward_model("tiny-org/rm")
    rm_by_path, _ = load_reward_model(rm)
    ids = np.asarray([rm_tok("Hello there, how are you?").input_ids])
    mask = np.ones_like(ids)
    np.testing.assert_allclose(rm_by_id(ids, mask), rm_by_path(ids, mask))


@pytest.mark.parametrize("name", ["tiny-org/missing", "tiny-org/policy@v9"])
def test_missing_id_offline_is_one_clear_line(hub_cache, name):
    with pytest.raises(ValueError) as err:
        load_pretrained(name)
    msg = str(err.value)
    assert "\n" not in msg and name in msg and "HF_HUB_OFFLINE" in msg and "neither a local path" in msg


def test_cli_reports_a_missing_id(hub_cache, capsys):
    assert cli(["generate", "--model", "tiny-org/missing", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model 'tiny-org/missing' is neither a local path nor in the HF cache")


@pytest.mark.slow
def test_train_accepts_a_hub_id(hub_cache, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    write_minisum_folder(data)
    run = tmp_path / "run"
    assert cli(["train", "model=tiny-org/policy", f"data={data}", f"run_dir={run}", "total_steps=1",
                "num_phases=1", "batch_size=2", "max_new_tokens=4", "eval_max_new_tokens=4", "lora_rank=2",
                "tied_pairs=second", "export_policy=false"]) == 0
    assert "bpo_jax train: tiny-org/policy" in capsys.readouterr().out
    with open(run / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [0, 1, 1]


def test_online_download_asks_for_safetensors_only(monkeypatch, tmp_path):
    """Online, the id goes to snapshot_download with its revision, the cache and patterns that fetch safetensors,
    configs and tokenizer files but never *.bin / *.pt (checked on a stand-in: no network in tests)."""
    import fnmatch

    seen = record_snapshot_download(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert resolve_model("some-org/some-model@v2") == str(tmp_path)
    assert seen["repo_id"] == "some-org/some-model" and seen["revision"] == "v2"
    assert seen["local_files_only"] is False and seen["cache_dir"] == str(tmp_path / "cache")

    def fetched(name):
        return (any(fnmatch.fnmatch(name, p) for p in seen["allow_patterns"])
                and not any(fnmatch.fnmatch(name, p) for p in seen["ignore_patterns"]))

    for name in ("model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
                 "config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "spm.model"):
        assert fetched(name), name
    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt", "flax_model.msgpack"):
        assert not fetched(name), name
