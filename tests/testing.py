"""Shared test helpers, torch-free (importing this module imports neither torch nor transformers): one tiny
decoder config, a random preference-pair batch in the train step's layout, and a tiny task folder in the demo's
(minisum) format. The HF-checkpoint helpers, which need torch, stay in ``tiny_models.py``. Importing it is cheap:
jax and bpo_jax are imported when a helper that needs them is called."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from bpo_jax.models.config import ModelConfig

TESTS = os.path.dirname(os.path.abspath(__file__))  # the tests/ folder (this module, conftest.py, ...)
ROOT = os.path.dirname(TESTS)  # the checkout: configs/, data/, launch/, README.md

# XLA:CPU compile options for the suite: LLVM at -O0 and the classic elemental emitters instead of the fusion
# emitters. The suite compiles hundreds of tiny programs whose run time is negligible next to their compile time;
# these options cut a cold tiny train run's CPU time by ~40% (27 s -> 15.5 s). They change how XLA generates
# machine code, never the program (every product code path runs as it does for a user).
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def xla_flags(devices: int) -> str:
    """``XLA_FLAGS`` for a child process: ``devices`` fake CPU devices and ``FAST_COMPILE_FLAGS``."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE_FLAGS}"


_TINY = dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
             num_kv_heads=2, head_dim=8)


def minimal_env(**extra) -> dict:
    """A child process's environment built from scratch rather than inherited: PATH, HOME, LANG and TMPDIR, and the
    session's shared compilation cache (``BPO_COMPILATION_CACHE`` and its threshold, set by conftest.py), from this
    process; then ``extra``. Nothing else leaks in (the pytest process's XLA_FLAGS in particular)."""
    keep = ("PATH", "HOME", "LANG", "TMPDIR", "BPO_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(extra)
    return env


def tiny_model_config(**overrides) -> ModelConfig:
    """A tiny random-init Llama ``ModelConfig``: vocab 96, hidden 32, MLP 64, 2 layers, 4 query heads over 2 KV
    heads of dim 8, every other field at its default (float32, no special token ids); ``overrides`` replace any
    field (``tiny_model_config(param_dtype="bfloat16")``)."""
    from bpo_jax.models.config import ModelConfig

    return ModelConfig(**{**_TINY, **overrides})


def random_pair_batch(rng_or_seed, batch: int, prompt_len: int, response_len: int, vocab: int, *, pad: bool = True,
                      low: int = 3, pad_id: int = 0, eos_id: int = 2, behavior_logps: float | None = None) -> dict:
    """``batch`` random preference pairs in the train step's layout (``bpo_jax.train.step``): a dict of jax arrays
    keyed by ``BATCH_KEYS``, ``*_ids``/``*_mask`` int32 ``[batch, prompt_len + response_len]``, the rest float32
    ``[batch]``.

    ``rng_or_seed`` (a seed or a ``np.random.Generator``) first draws the chosen rows, then the rejected rows,
    each uniform in ``[low, vocab)`` (so ``pad_id``/``eos_id`` below ``low`` never occur by chance). With ``pad``,
    a pair shares its prompt (the rejected row's prompt is the chosen one's), left-padded by 0 to
    ``prompt_len - 1`` tokens, and each response is right-padded to 1 to ``response_len`` real tokens, one shorter
    than ``response_len`` ending in ``eos_id``; padded positions hold ``pad_id`` and mask 0. Without ``pad`` every
    position is a real token (all-ones masks) and the rows are as drawn. ``truncated`` is the fraction of the
    pair's two responses that fill ``response_len`` without an EOS (1 everywhere without ``pad``).
    ``behavior_logps``: None draws each response's log-prob as a sum of per-token values in [-3, -0.1); a number
    puts that value in every row (``reference=sft`` never reads them for the loss)."""
    import jax.numpy as jnp

    from bpo_jax.train.step import BATCH_KEYS

    rng = np.random.default_rng(rng_or_seed)
    width = prompt_len + response_len
    ids = {side: rng.integers(low, vocab, (batch, width)).astype(np.int32) for side in ("chosen", "rejected")}
    masks = {side: np.ones((batch, width), np.int32) for side in ids}
    lengths = {side: np.full(batch, response_len) for side in ids}
    if pad:
        ids["rejected"][:, :prompt_len] = ids["chosen"][:, :prompt_len]
        left = rng.integers(0, prompt_len, batch)
        for side in ids:
            lengths[side] = rng.integers(1, response_len + 1, batch)
            col = np.arange(width)[None]
            masks[side] = (((col >= left[:, None]) & (col < prompt_len))
                           | ((col >= prompt_len) & (col < prompt_len + lengths[side][:, None]))).astype(np.int32)
            short = np.flatnonzero(lengths[side] < response_len)
            ids[side][short, prompt_len + lengths[side][short] - 1] = eos_id
            ids[side] = np.where(masks[side] == 1, ids[side], pad_id).astype(np.int32)
    logps = {}
    for side in ids:
        if behavior_logps is None:
            per_token = rng.uniform(-3.0, -0.1, (batch, response_len))
            logps[side] = (per_token * (np.arange(response_len)[None] < lengths[side][:, None])).sum(1)
        else:
            logps[side] = np.full(batch, behavior_logps)
    truncated = 0.5 * sum((lengths[side] == response_len).astype(np.float32) for side in ids)
    values = (ids["chosen"], masks["chosen"], ids["rejected"], masks["rejected"], logps["chosen"], logps["rejected"],
              truncated)
    return {k: jnp.asarray(v, jnp.int32 if k.endswith(("_ids", "_mask")) else jnp.float32)
            for k, v in zip(BATCH_KEYS, values)}


def write_minisum_folder(folder, rows: int = 6, groups: int = 0):
    """``folder/{train,test}.jsonl`` (``folder`` a ``pathlib.Path`` that exists), each ``rows`` short documents
    in the minisum format (``id``, ``document``, ``reference``, ``gold``, and with ``groups`` > 0 row i's
    ``group`` ``g<i mod groups>``; the same rows in both splits); returns ``folder``."""
    data = [{"id": f"r{i}", "document": f"Town {i} opened a park with {i + 3} benches on Monday.",
             "reference": f"Town {i} has a new park.", "gold": f"Town {i} opened a park with {i + 3} benches.",
             **({"group": f"g{i % groups}"} if groups else {})}
            for i in range(rows)]
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    return folder


# A paper task config (configs/*_gemma2b.yaml) cut to seconds on a CPU with the ``tiny_policy_and_rm`` fixture's
# models: 2 steps in 2 phases of 2 pairs, 4 new tokens, float32 LoRA rank 2 in a 2-member ensemble, 4 test prompts.
TINY_PAPER_RUN = ["total_steps=2", "num_phases=2", "batch_size=2", "data_dir=", "max_new_tokens=4",
                  "eval_max_new_tokens=4", "lora_rank=2", "lora_alpha=4", "ensemble_size=2", "param_dtype=float32",
                  "dtype=float32", "remat=false", "eval_size=4", "reward_batch_size=4", "export_policy=false"]


def full_forward_logprobs(model, prompts, prompt_mask, tokens, mask):
    """The log-probability of each response token from one forward pass over prompt + response (the reference
    the sampler's incremental, KV-cached log-probs are checked against); 0 where ``mask`` is 0."""
    import jax.numpy as jnp

    from bpo_jax.logprobs import token_logprobs
    from bpo_jax.models import forward

    ids = jnp.concatenate([jnp.asarray(prompts), tokens], axis=1)
    m = jnp.concatenate([jnp.asarray(prompt_mask), mask], axis=1)
    logits, _ = forward(model.config, model.params, ids, attention_mask=m)
    p = prompts.shape[1]
    return token_logprobs(logits[:, p - 1 : -1], tokens) * mask


def launcher_repo(tmp_path):
    """``(repo, calls)``: a copy of the launch scripts and requirement files in ``tmp_path/repo`` beside a fake
    ``.venv`` whose ``python`` only records each call (pip's included) as a line in ``calls``, with the BPO_*
    launch variables it saw: the launchers' own logic, run by a real shell (or a real Slurm), without installing
    or training anything."""
    import shutil
    import stat

    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    for f in ("launch/_setup.sh", "launch/slurm.sh", "requirements.txt", "requirements-gpu.txt",
              "requirements-tpu.txt", "pyproject.toml"):
        shutil.copy(os.path.join(ROOT, f), repo / f)
    venv = repo / ".venv/bin"
    venv.mkdir(parents=True)
    (venv / "activate").write_text(f'PATH="{venv}:$PATH"\n')
    calls = tmp_path / "python_calls"
    python = venv / "python"
    python.write_text(f'#!/bin/sh\n{{ printf "%s " "BPO_PROCESS_ID=$BPO_PROCESS_ID" '
                      f'"BPO_NUM_PROCESSES=$BPO_NUM_PROCESSES" "BPO_COORDINATOR_ADDRESS=$BPO_COORDINATOR_ADDRESS" '
                      f'"$@"; echo; }} >> "{calls}"\n')
    python.chmod(python.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return repo, calls


def record_snapshot_download(monkeypatch, folder) -> dict:
    """Replace ``huggingface_hub.snapshot_download`` with a stand-in that records its arguments (``repo_id`` and
    the keywords) in the returned dict and answers ``folder``; the hub is put online for the call (no network is
    reached: nothing is downloaded)."""
    import huggingface_hub

    seen: dict = {}

    def snapshot_download(repo_id, **kw):
        seen.update(kw, repo_id=repo_id)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    return seen
