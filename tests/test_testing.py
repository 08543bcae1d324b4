"""The shared test helpers keep their contracts: ``testing`` and ``tiny_models`` import without torch or
transformers, and ``random_pair_batch`` is in the train step's layout."""

import json
import os
import subprocess
import sys

import numpy as np

from bpo_jax.train.step import BATCH_KEYS
from testing import TESTS, random_pair_batch, tiny_model_config, write_minisum_folder


def test_helpers_import_without_torch_or_transformers():
    code = (f"import sys; sys.path.insert(0, {TESTS!r}); import testing, tiny_models; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, "
            "[m for m in ('torch', 'transformers') if m in sys.modules]")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_tiny_model_config_defaults_and_overrides():
    cfg = tiny_model_config()
    assert (cfg.model_type, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads,
            cfg.num_kv_heads, cfg.head_dim, cfg.param_dtype) == ("llama", 96, 32, 64, 2, 4, 2, 8, "float32")
    assert tiny_model_config(vocab_size=128, param_dtype="bfloat16") == cfg.replace(vocab_size=128,
                                                                                    param_dtype="bfloat16")


def test_random_pair_batch_layout():
    b, p, n, v = 16, 6, 5, 96
    batch = {k: np.asarray(x) for k, x in random_pair_batch(3, b, p, n, v).items()}
    assert tuple(batch) == BATCH_KEYS
    np.testing.assert_array_equal(batch["chosen_ids"][:, :p], batch["rejected_ids"][:, :p])  # one shared prompt
    lengths = []
    for side in ("chosen", "rejected"):
        ids, mask = batch[f"{side}_ids"], batch[f"{side}_mask"]
        assert ids.shape == mask.shape == (b, p + n) and ids.dtype == mask.dtype == np.int32
        assert (np.diff(mask[:, :p], axis=1) >= 0).all() and mask[:, p - 1].all()  # left-padded, ≥ 1 token
        assert (np.diff(mask[:, p:], axis=1) <= 0).all() and mask[:, p].all()  # right-padded, ≥ 1 token
        assert (ids[mask == 0] == 0).all() and ((ids[mask == 1] >= 2) & (ids[mask == 1] < v)).all()
        length = mask[:, p:].sum(1)
        last = ids[np.arange(b), p + length - 1]
        assert ((last == 2) == (length < n)).all()  # a shorter response ends in EOS; a full one has none
        assert (batch[f"{side}_behavior_logps"] < 0).all() and batch[f"{side}_behavior_logps"].dtype == np.float32
        lengths.append(length)
    np.testing.assert_array_equal(batch["truncated"], 0.5 * sum((x == n) for x in lengths))
    unpadded = random_pair_batch(np.random.default_rng(0), 2, p, n, v, pad=False, behavior_logps=0.0)
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(unpadded["chosen_ids"], rng.integers(3, v, (2, p + n)))  # the first two draws
    np.testing.assert_array_equal(unpadded["rejected_ids"], rng.integers(3, v, (2, p + n)))
    assert np.asarray(unpadded["chosen_mask"]).all() and not np.asarray(unpadded["rejected_behavior_logps"]).any()


def test_write_minisum_folder(tmp_path):
    assert write_minisum_folder(tmp_path, rows=3) == tmp_path
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (tmp_path / f"{split}.jsonl").read_text().splitlines()]
        assert [r["id"] for r in rows] == ["r0", "r1", "r2"]
        assert all(set(r) == {"id", "document", "reference", "gold"} for r in rows)


def test_the_suite_and_its_child_processes_compile_with_the_fast_flags():
    """conftest.py puts ``FAST_COMPILE_FLAGS`` in the suite's XLA_FLAGS; ``child_env`` in a child's, with its own
    device count and nothing else from this process."""
    from multihost import child_env
    from testing import FAST_COMPILE_FLAGS

    assert FAST_COMPILE_FLAGS in os.environ["XLA_FLAGS"]
    assert child_env(2)["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2",
                                                 *FAST_COMPILE_FLAGS.split()]
    code = "import jax; print(jax.device_count())"
    out = subprocess.run([sys.executable, "-c", code], env=child_env(3), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "3"  # XLA accepts the flags (an unknown flag aborts the process)
