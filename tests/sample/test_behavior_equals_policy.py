"""π_β = π_θ exactly at a phase start under a bfloat16 base: the sampler runs the train step's own
activation-space adapters, so a ΔW below half an ulp of W (which merging into bfloat16 weights rounds away)
still reaches π_β's log-probs; and the train step's ``policy_behavior_logp_gap`` check that sees it when it does not."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bpo_jax.config import TrainConfig
from bpo_jax.models import init_params, lora
from bpo_jax.sample.sampler import Decoding, generate
from bpo_jax.train import state as st
from bpo_jax.train.pairs import build_pairs
from bpo_jax.train.step import BATCH_KEYS, LOGP_GAP_TOL_PER_TOKEN, PHASE_START_KEY, make_train_step, pair_logps
from testing import random_pair_batch, tiny_model_config

MCFG = tiny_model_config(param_dtype="bfloat16")  # bf16 base, f32 compute
P, N, B = 6, 5, 4
FLOOR = 1.5 * 2.0 ** -4  # |W| ≥ 0.094: half an ulp ≥ 2^-12 = 2.4e-4 (not a power of two: the same both ways)
LR = 6e-5  # one AdamW step from B = 0 moves B by ≈ lr: |ΔW| ≤ s·r·max|A|·lr ≈ 1.7e-4, below half an ulp


def _base():
    """A bfloat16 base whose target weights are all ≥ ``FLOOR`` in magnitude (so every ΔW here is below half
    their ulp)."""
    base = init_params(MCFG, jax.random.key(0))
    layers = dict(base["layers"])
    for name in lora.TARGETS:
        w = layers[name].astype(jnp.float32)
        layers[name] = (jnp.where(w < 0, -1.0, 1.0) * jnp.maximum(jnp.abs(w), FLOOR)).astype(jnp.bfloat16)
    return {**base, "layers": layers}


def _cfg():
    return TrainConfig(total_steps=4, num_phases=2, batch_size=B, learning_rate=LR, max_new_tokens=N,
                       lora_rank=4, reference="sft", share_prompt=False)


def _random_batch(seed=0):
    return random_pair_batch(seed, B, P, N, MCFG.vocab_size, pad=False, behavior_logps=0.0)


def _sampled_batch(mcfg, behavior):
    """π_β's samples for B prompts as a train batch (what ``online.collect_pairs`` builds)."""
    rng = np.random.default_rng(1)
    ids, mask = rng.integers(3, 96, (B, P)).astype(np.int32), np.ones((B, P), np.int32)
    out = generate(behavior, ids, mask, Decoding(max_new_tokens=N, num_samples=2), config=mcfg, rng=jax.random.key(3))
    pairs = build_pairs(ids, mask, out.tokens, out.mask, out.logprobs, np.arange(2 * B, dtype=np.float32),
                        np.ones(B, bool))
    return {k: jnp.asarray(pairs[k]) for k in BATCH_KEYS}


def _policy_gap(cfg, mcfg, state, batch):
    """The train step's own (max, mean) |π_θ − sampler| gap on ``batch`` as a phase's first batch."""
    state = jax.tree.map(jnp.copy, state)  # the step donates its state
    _, m = make_train_step(cfg, mcfg, st.shardings(state), prompt_len=P)(state, {**batch, PHASE_START_KEY: jnp.ones(B)})
    return float(m["policy_behavior_logp_gap"]), float(m["policy_behavior_logp_gap_mean"])


def _stepped_state(mcfg):
    """One real train step from B = 0 (a ΔW below half an ulp of every W entry), then a phase change."""
    cfg, base = _cfg(), _base()
    state = st.create_state(cfg, base, jax.random.key(1))
    state, _ = make_train_step(cfg, mcfg, st.shardings(state), prompt_len=P)(state, _random_batch())
    return cfg, st.sync_behavior(cfg, state)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sampler_logps_equal_the_train_steps_policy_after_a_sub_ulp_step(dtype):
    mcfg = MCFG.replace(dtype=dtype)
    cfg, state = _stepped_state(mcfg)
    deltas = {n: lora.delta(jax.tree.map(lambda x: x[0], f), cfg.lora_scale) for n, f in state.trainable.items()}
    assert float(max(jnp.max(jnp.abs(d)) for d in deltas.values())) > 0  # the step moved the adapter ...
    merged = st.merged_params(cfg, state.base, state.trainable)
    jax.tree.map(np.testing.assert_array_equal, merged, state.base)  # ... by less than half an ulp of every W
    batch = _sampled_batch(mcfg, st.behavior_params(cfg, state))
    policy = st.adapter_params(cfg, state.base, jax.tree.map(lambda x: x[0], state.trainable))  # the loss's π_θ
    pc, pr, _, _ = pair_logps(mcfg, policy, batch, P)
    tol = LOGP_GAP_TOL_PER_TOKEN[dtype] * N
    np.testing.assert_allclose(pc, batch["chosen_behavior_logps"], atol=tol)
    np.testing.assert_allclose(pr, batch["rejected_behavior_logps"], atol=tol)
    gap = _policy_gap(cfg, mcfg, state, batch)
    assert gap[0] <= tol and 0 <= gap[1] <= gap[0]
    if dtype == "float32":  # the check can see a π_β rounded into bfloat16 weights: far above the tolerance
        rounded = _sampled_batch(mcfg, merged)
        assert _policy_gap(cfg, mcfg, state, rounded)[0] > 10 * tol


@pytest.mark.slow
def test_sampling_shardings_place_attached_factors():
    """``sampling_shardings(..., params=)`` covers the ``<target>_lora`` entries: ``generate`` with them on a
    mesh samples what it samples unplaced."""
    from bpo_jax.runtime import sharding as shd
    from bpo_jax.sample.sampler import sampling_shardings

    cfg, state = _stepped_state(MCFG)
    behavior = st.behavior_params(cfg, state)
    mesh = shd.make_mesh(data=-1)
    target = sampling_shardings(MCFG, mesh, params=behavior)
    assert set(target["layers"]["q_lora"]) == {"a", "b"}
    ids, mask = np.full((2, P), 5, np.int32), np.ones((2, P), np.int32)
    want = generate(behavior, ids, mask, Decoding(max_new_tokens=3), config=MCFG, rng=jax.random.key(0))
    got = generate(behavior, ids, mask, Decoding(max_new_tokens=3), config=MCFG, rng=jax.random.key(0), mesh=mesh,
                   param_shardings=target)
    np.testing.assert_array_equal(got.tokens, want.tokens)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_full_ft_samples_with_the_masters_as_the_step_runs_them(dtype):
    """Full fine-tuning on a bfloat16 base: π_β is the float32 masters, taken in the compute dtype (matrices
    cast as the decoder casts them, norm weights kept float32, as the decoder reads them); the sampler's
    log-probs equal the step's. A bfloat16 copy of the masters (the old merged path) would not be π_θ."""
    mcfg = MCFG.replace(dtype=dtype)
    cfg = dataclasses.replace(_cfg(), lora_rank=0)
    state = st.create_state(cfg, _base(), jax.random.key(1), compute_dtype=dtype)
    state, _ = make_train_step(cfg, mcfg, st.shardings(state), prompt_len=P)(state, _random_batch())
    state = st.sync_behavior(cfg, state, dtype)
    behavior = st.behavior_params(cfg, state, mcfg.dtype)
    assert behavior["layers"]["attn_norm"].dtype == jnp.float32 and behavior["final_norm"].dtype == jnp.float32
    assert behavior["layers"]["q"].dtype == state.behavior["layers"]["q"].dtype == jnp.dtype(dtype)
    batch = _sampled_batch(mcfg, behavior)
    tol = LOGP_GAP_TOL_PER_TOKEN[dtype] * N
    assert _policy_gap(cfg, mcfg, state, batch)[0] <= tol
    if dtype == "float32":
        rounded = _sampled_batch(mcfg, st.merged_params(cfg, state.base, state.trainable))
        assert _policy_gap(cfg, mcfg, state, rounded)[0] > 10 * tol
