"""The Checkpointer's base-weights fingerprint: computed once per base (the same arrays at every save), again
for other arrays, and a resume still refuses other base weights."""

import jax
import jax.numpy as jnp
import pytest

from bpo_jax.config import TrainConfig
from bpo_jax.models import init_params
from bpo_jax.train import checkpoint
from bpo_jax.train import state as st
from bpo_jax.train.checkpoint import Checkpointer, IncompatibleCheckpoint
from testing import tiny_model_config

MCFG = tiny_model_config()
CFG = TrainConfig(lora_rank=2, lora_alpha=4, batch_size=2, total_steps=4, num_phases=1, learning_rate=1e-2)


def _fresh(base=None):
    base = init_params(MCFG, jax.random.key(0)) if base is None else base
    return st.committed(st.create_state(CFG, base, jax.random.key(1)))


def test_base_fingerprint_once_per_base_and_other_weights_refused(tmp_path, monkeypatch):
    calls = []
    real = checkpoint.fingerprint
    monkeypatch.setattr(checkpoint, "fingerprint", lambda params: calls.append(1) or real(params))
    state = _fresh()
    ckpt = Checkpointer(str(tmp_path), keep=3)
    ckpt.save(1, state, None, {})
    ckpt.save(2, state, None, {})
    ckpt.restore(2, state)
    assert len(calls) == 1  # the same base arrays: computed once
    ckpt.restore(2, _fresh(jax.tree.map(jnp.copy, state.base)))  # equal values, other arrays: computed again
    assert len(calls) == 2
    other = jax.tree.map(lambda x: x * 1.01, state.base)
    with pytest.raises(IncompatibleCheckpoint, match="different base weights"):
        ckpt.restore(2, _fresh(other))
    ckpt.close()
