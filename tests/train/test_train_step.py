"""The train step: BPO's log 2 at phase starts, reference modes, trainable-only updates, LoRA merge,
gradient accumulation, sampler log-probs = reference forward, and sharding on 8 fake devices."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bpo_jax.config import TrainConfig
from bpo_jax.models import init_params, lora, param_axes
from bpo_jax.runtime import distributed
from bpo_jax.runtime import sharding as shd
from bpo_jax.sample.sampler import Decoding, distinct, generate
from bpo_jax.train import state as st
from bpo_jax.train.pairs import build_pairs
from bpo_jax.train.step import BATCH_KEYS, PHASE_START_KEY, behavior_logp_gap, make_train_step, pair_logps
from testing import tiny_model_config

MCFG = tiny_model_config()
P, N, B = 6, 5, 4
LOG2 = float(np.log(2.0))


def _cfg(**kw):
    base = dict(total_steps=4, num_phases=2, batch_size=B, learning_rate=1e-2, max_new_tokens=N)
    return TrainConfig(**{**base, **kw})


def _base(seed=0):
    return init_params(MCFG, jax.random.key(seed))


def _batch(params, seed=0):
    """Pairs sampled from ``params`` (the behavior LLM), ordered by a toy score (response token sum)."""
    rng = np.random.default_rng(seed)
    prompts = rng.integers(3, 96, (B, P)).astype(np.int32)
    pmask = np.ones_like(prompts)
    pmask[0, :2] = 0
    prompts[0, :2] = 0
    out = generate(params, prompts, pmask, Decoding(max_new_tokens=N, num_samples=2, eos_token_ids=(2,)), config=MCFG,
                   rng=jax.random.key(seed))
    toks, mask = np.asarray(out.tokens), np.asarray(out.mask)
    assert (toks[0::2] != toks[1::2]).any(axis=1).all()
    return build_pairs(prompts, pmask, toks, mask, np.asarray(out.logprobs), (toks * mask).sum(1), np.ones(B, bool),
                       eos_token_ids=(2,))


def _step(cfg, state, batch):
    fn = make_train_step(cfg, MCFG, st.shardings(state), prompt_len=P)
    return fn(state, {k: jnp.asarray(batch[k]) for k in (*BATCH_KEYS, PHASE_START_KEY) if k in batch})


@pytest.mark.slow
def test_behavior_reference_gives_log2_at_every_phase_start_and_sft_does_not():
    for reference in ("behavior", "sft"):
        cfg = _cfg(reference=reference)
        state = st.create_state(cfg, _base(), jax.random.key(1))
        state, m = _step(cfg, state, _batch(st.behavior_params(cfg, state)))
        np.testing.assert_allclose(float(m["loss"]), LOG2, atol=1e-5)  # phase 1: π_θ = π_β = SFT
        assert float(m["kl_policy_behavior"]) < 1e-6
        state, m = _step(cfg, state, _batch(st.behavior_params(cfg, state), seed=1))
        assert abs(float(m["loss"]) - LOG2) > 1e-4  # the policy moved within the phase
        state = st.sync_behavior(cfg, state)  # phase 2: π_β ← π_θ, and it samples the new pairs
        batch = _batch(st.behavior_params(cfg, state), seed=2)
        state, m = _step(cfg, state, batch)
        if reference == "behavior":
            np.testing.assert_allclose(float(m["loss"]), LOG2, atol=1e-5)
        else:
            assert abs(float(m["loss"]) - LOG2) > 1e-3


def test_sampler_logprobs_equal_a_reference_forward():
    params = _base()
    batch = _batch(params)
    gap = behavior_logp_gap(MCFG, params, {k: jnp.asarray(v) for k, v in batch.items()}, prompt_len=P)
    assert float(gap) < 1e-4


@pytest.mark.slow
def test_lora_ensemble_updates_only_adapters_and_merge_is_the_mean_delta():
    cfg = _cfg(lora_rank=4, lora_alpha=8.0, ensemble_size=3, lora_targets=("q_proj", "v", "down"))
    assert cfg.lora_targets == ("q", "v", "down")
    base = _base()
    state = st.create_state(cfg, base, jax.random.key(2))
    assert set(state.trainable) == {"q", "v", "down"}
    assert state.trainable["q"]["a"].shape == (3, 2, 32, 4) and state.trainable["down"]["b"].shape == (3, 2, 4, 32)
    # Optimizer moments exist for the LoRA factors only, one set per adapter.
    opt_shapes = {x.shape for x in jax.tree.leaves(state.opt_state)}
    assert opt_shapes <= {x.shape for x in jax.tree.leaves(state.trainable)} | {(3,)}
    base_before = jax.tree.map(np.asarray, state.base)
    for seed in range(2):
        state, _ = _step(cfg, state, _batch(st.behavior_params(cfg, state), seed))
    jax.tree.map(np.testing.assert_array_equal, base_before, jax.tree.map(np.asarray, state.base))
    a, b = np.asarray(state.trainable["q"]["a"]), np.asarray(state.trainable["q"]["b"])
    assert not np.allclose(b[0], b[1])  # adapters differ (own init, own optimizer)
    assert "q_lora" in st.policy_params(cfg, state)["layers"]  # evaluated in activation space, ...
    merged = st.export_params(cfg, state)  # ... exported merged into the weights
    want = base_before["layers"]["q"] + (8.0 / 4) * np.mean(np.einsum("nlir,nlro->nlio", a, b), axis=0)
    np.testing.assert_allclose(np.asarray(merged["layers"]["q"]), want, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(merged["layers"]["k"]), base_before["layers"]["k"])


@pytest.mark.slow
def test_gradient_accumulation_and_chunked_logprobs_equal_the_plain_step():
    """Two micro-batches equal the large batch; unembedding the response 2 positions at a time (rematerialised)
    equals unembedding it whole."""
    results = []
    for over in ({}, {"micro_batches": 2}, {"logprob_chunk": 2}):
        cfg = _cfg(**over, lora_rank=4, reference="sft")
        state = st.create_state(cfg, _base(), jax.random.key(3))
        state, _ = _step(cfg, state, _batch(st.behavior_params(cfg, state)))  # B ≠ 0 after one step
        state, m = _step(cfg, state, _batch(st.behavior_params(cfg, state), seed=5))
        results.append((m, jax.tree.map(np.asarray, state.trainable)))
    (m1, t1) = results[0]
    for m2, t2 in results[1:]:
        for key in ("loss", "grad_norm", "rewards/margins"):
            np.testing.assert_allclose(float(m1[key]), float(m2[key]), rtol=1e-5, atol=1e-6)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), t1, t2)


@pytest.mark.slow
def test_fixed_reference_is_used_and_checked():
    cfg = _cfg(reference="fixed", reference_path="unused-here")
    other = _base(seed=9)
    state = st.create_state(cfg, _base(), jax.random.key(6), reference=other)
    assert st.reference_params(cfg, state) is state.reference
    _, m = _step(cfg, state, _batch(st.behavior_params(cfg, state)))
    assert abs(float(m["loss"]) - LOG2) > 1e-3  # π_θ = SFT ≠ the fixed reference at step 1
    small = init_params(MCFG.replace(intermediate_size=32), jax.random.key(0))
    with pytest.raises(ValueError, match="do not have the policy's architecture"):
        st.create_state(cfg, _base(), jax.random.key(6), reference=small)


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["ema", "mixup"])
def test_soft_reference_updates(reference):
    cfg = _cfg(reference=reference, lora_rank=4, ema_rate=0.5, mixup_alpha=0.5, mixup_every=2)
    state = st.create_state(cfg, _base(), jax.random.key(4))
    ref0 = jax.tree.map(np.asarray, state.reference)
    state, _ = _step(cfg, state, _batch(st.behavior_params(cfg, state)))
    ref1, theta1 = jax.tree.map(np.asarray, state.reference), jax.tree.map(np.asarray, state.trainable)
    if reference == "ema":
        jax.tree.map(lambda r1, r0, t: np.testing.assert_allclose(r1, 0.5 * r0 + 0.5 * t, atol=1e-7),
                     ref1, ref0, theta1)
    else:  # not due at step 1
        jax.tree.map(np.testing.assert_array_equal, ref1, ref0)
        state, _ = _step(cfg, state, _batch(st.behavior_params(cfg, state), seed=1))
        theta2 = jax.tree.map(np.asarray, state.trainable)
        jax.tree.map(lambda r2, r1, t: np.testing.assert_allclose(r2, 0.5 * t + 0.5 * r1, atol=1e-7),
                     jax.tree.map(np.asarray, state.reference), ref1, theta2)


@pytest.mark.slow
def test_state_sharding_on_8_devices_matches_one_device():
    cfg = _cfg(lora_rank=4, ensemble_size=2, reference="sft")
    batch = _batch(_base())
    single = st.create_state(cfg, _base(), jax.random.key(5))
    _, m_single = _step(cfg, single, batch)

    mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
    base = _base()
    base = shd.shard(base, shd.logical_to_sharding(param_axes(MCFG), base, mesh))
    state = st.create_state(cfg, base, jax.random.key(5))
    assert state.base["layers"]["gate"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    P = jax.sharding.PartitionSpec
    assert _placed(state.trainable["gate"]["a"], mesh, P(None, None, "fsdp", None))
    # B's output dim is tensor-sharded, so its rank dim takes fsdp: no factor is replicated across fsdp
    assert _placed(state.opt_state[1][0].mu["gate"]["b"], mesh, P(None, None, "fsdp", "tensor"))
    assert _placed(state.trainable["down"]["a"], mesh, P(None, None, "tensor", "fsdp"))
    assert _placed(state.trainable["down"]["b"], mesh, P(None, None, None, "fsdp"))
    new_state, m = _step(cfg, state, distributed.global_rows(batch, mesh))
    assert _placed(new_state.trainable["gate"]["b"], mesh, P(None, None, "fsdp", "tensor"))
    for key in ("loss", "grad_norm", "kl_policy_behavior"):
        np.testing.assert_allclose(float(m[key]), float(m_single[key]), rtol=1e-4, atol=1e-6)


def _placed(x, mesh, spec) -> bool:
    """Whether ``x`` is laid out on ``mesh`` as ``spec`` says (with or without trailing Nones)."""
    return x.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, spec), x.ndim)


def test_lora_factors_and_moments_are_born_sharded():
    """On a mesh no device ever holds a whole LoRA factor: ``init_trainable`` runs with device-to-device transfers
    refused (the eager init made each factor on one device, then placed it), from a fresh init (equal to the
    one-device init, value for value) and from adapter-folder factors (host arrays, placed shard by shard); the
    state's moments are laid out like their factors."""
    cfg = _cfg(lora_rank=4, ensemble_size=2)
    mesh = shd.make_mesh(data=1, fsdp=4, tensor=2)
    base = _base()
    base = shd.shard(base, shd.logical_to_sharding(param_axes(MCFG), base, mesh))
    key = jax.random.key(5)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    on_mesh = jax.random.wrap_key_data(jax.device_put(jax.random.key_data(key), replicated))
    want = lora.init_lora(key, _base()["layers"], targets=cfg.lora_targets, rank=4, num_adapters=2)
    folders = jax.tree.map(lambda x: np.asarray(x) + 0.5, want)  # B != 0, as a trained adapter
    for lora_init, expect in ((None, want), (folders, folders)):
        with jax.transfer_guard_device_to_device("disallow_explicit"):
            trainable = st.init_trainable(cfg, base, on_mesh, lora_init)
        for t in cfg.lora_targets:
            for k in ("a", "b"):
                got = trainable[t][k]
                assert got.sharding.is_equivalent_to(st.lora_shardings(want, base)[t][k], got.ndim)
                assert got.addressable_shards[0].data.size < got.size  # no factor is replicated across the mesh
                np.testing.assert_array_equal(np.asarray(got), np.asarray(expect[t][k]))
    state = st.create_state(cfg, base, key, lora_init=folders)
    for k in ("a", "b"):
        mu = state.opt_state[1][0].mu["gate"][k]
        assert mu.sharding.is_equivalent_to(state.trainable["gate"][k].sharding, mu.ndim)
    with pytest.raises(ValueError, match="do not have the run's shapes"):
        st.init_trainable(cfg, base, key, {**folders, "q": {**folders["q"], "a": folders["q"]["a"][:1]}})


@pytest.mark.parametrize("merge,rank", [("peft_linear", 4), ("mean_delta", 3 * 4)])
def test_behavior_is_kept_merged_born_sharded_and_sampled_as_the_step_merges(merge, rank):
    """``state.behavior`` is π_β's one merged adapter (``lora.merged_attachment``), not the N members: rank r
    under peft_linear (1/N of the bytes), N·r under mean_delta; made and re-taken at a phase boundary with
    device-to-device transfers refused, no factor replicated; sampled as the train step's merged ensemble
    (``attach_merged`` of the members, as the step scores π_θ at a phase start) to float32 rounding, and
    exactly under mean_delta (a concatenation and the same scaling)."""
    cfg = _cfg(lora_rank=4, ensemble_size=3, ensemble_merge=merge)
    mesh = shd.make_mesh(data=1, fsdp=4, tensor=2)
    base = shd.shard(_base(), shd.logical_to_sharding(param_axes(MCFG), _base(), mesh))
    folders = jax.tree.map(lambda x: np.asarray(x) + 0.5, lora.init_lora(  # B != 0: the members differ
        jax.random.key(3), _base()["layers"], targets=cfg.lora_targets, rank=4, num_adapters=3))
    state = st.create_state(cfg, base, jax.random.key(5), lora_init=folders)
    with jax.transfer_guard_device_to_device("disallow_explicit"):
        assert st.take_behavior(cfg, state.trainable, state.base)["q"]["a"].addressable_shards[0].data.size < \
            state.behavior["q"]["a"].size
        state = st.sync_behavior(cfg, state)
    for t in cfg.lora_targets:
        a, b = state.behavior[t]["a"], state.behavior[t]["b"]
        assert (a.shape[-1], b.shape[-2], a.ndim) == (rank, rank, 3)  # no ensemble axis
        assert a.addressable_shards[0].data.size < a.size and b.addressable_shards[0].data.size < b.size
    pi_beta = st.behavior_params(cfg, state)
    step_view = lora.attach_merged(state.base, state.trainable, cfg.lora_scale, merge)
    for t in cfg.lora_targets:
        for k in ("a", "b"):
            got, want = np.asarray(pi_beta["layers"][f"{t}_lora"][k]), np.asarray(step_view["layers"][f"{t}_lora"][k])
            if merge == "mean_delta":
                np.testing.assert_array_equal(got, want)
            else:
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert pi_beta["layers"]["q"] is state.base["layers"]["q"]  # attached: no merged weight


def test_a_checkpoint_with_the_members_as_behavior_resumes_merged(tmp_path):
    """A LoRA checkpoint written when ``behavior`` held the N members' factors (before π_β was kept merged) is
    restored as written and merged on resume (``merge_legacy_behavior``): the π_β it had, now in the kept form."""
    from bpo_jax.train.checkpoint import Checkpointer

    cfg = _cfg(lora_rank=4, ensemble_size=2, ensemble_merge="peft_linear")
    fresh = lambda: st.committed(st.create_state(cfg, _base(), jax.random.key(1)))  # noqa: E731
    old = fresh()
    members = jax.tree.map(lambda x: x + 0.25, old.trainable)  # π_β's members at the last sync
    ckpt = Checkpointer(str(tmp_path), keep=2)
    ckpt.save(3, old.replace(behavior=members), None, {})
    restored, _, _ = ckpt.restore(3, fresh())
    assert jax.tree.map(jnp.shape, restored.behavior) == jax.tree.map(jnp.shape, old.trainable)
    merged = st.merge_legacy_behavior(cfg, restored)
    want = lora.merged_attachment(members, cfg.lora_scale, "peft_linear")
    jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6), merged.behavior,
                 want)
    assert st.merge_legacy_behavior(cfg, merged) is merged  # already merged: as it is
    ckpt.save(4, merged, None, {})
    assert jax.tree.map(jnp.shape, ckpt.restore(4, fresh())[0].behavior) == jax.tree.map(jnp.shape, want)
    ckpt.close()


@pytest.mark.slow
def test_checkpoint_restores_onto_a_different_mesh_with_the_same_devices(tmp_path):
    """A state and a phase's pairs saved on a data=8 mesh come back exactly on a data=2 x fsdp=2 x tensor=2 mesh,
    in the new mesh's shardings (orbax reshards)."""
    from bpo_jax.train.checkpoint import Checkpointer

    cfg = _cfg(lora_rank=4, ensemble_size=2, reference="ema")
    pairs = {k: np.asarray(v) for k, v in _batch(_base()).items()}
    states = []
    for sizes in ((8, 1, 1), (2, 2, 2)):
        mesh = shd.make_mesh(*sizes)
        base = shd.shard(_base(), shd.logical_to_sharding(param_axes(MCFG), _base(), mesh))
        states.append((mesh, st.create_state(cfg, base, jax.random.key(5 + len(states)))))
    (mesh_a, saved), (mesh_b, template) = states
    ckpt = Checkpointer(str(tmp_path), keep=2)
    ckpt.save(3, saved, distributed.global_rows(pairs, mesh_a), {"prompts": [{"position": 12}]})
    restored, got_pairs, meta = ckpt.restore(3, template, mesh=mesh_b)
    ckpt.close()
    assert meta["prompts"] == [{"position": 12}] and meta["process_count"] == 1
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 saved.replace(base=None), restored.replace(base=None))
    jax.tree.map(lambda r, t: assert_sharding(r, t), restored.replace(base=None), template.replace(base=None))
    for k, v in pairs.items():
        np.testing.assert_array_equal(got_pairs[k], v)


def assert_sharding(restored, template):
    assert restored.sharding.is_equivalent_to(template.sharding, restored.ndim)


def test_identical_pairs_are_compared_as_text():
    # different token sequences that decode to the same stripped text are the same response to the annotator
    assert distinct(["a cat", "a cat", "a cat", "a dog", "", ""]).tolist() == [False, True, False]


def _step_jaxpr(cfg, model_config) -> str:
    state = st.create_state(cfg, _base(), jax.random.key(1))
    batch = _batch(st.behavior_params(cfg, state))
    keys = ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask", "chosen_behavior_logps",
            "rejected_behavior_logps", "truncated")
    fn = make_train_step(cfg, model_config, st.shardings(state), prompt_len=P)
    return str(jax.make_jaxpr(fn)(state, {k: jnp.asarray(batch[k]) for k in keys}))


def test_the_step_takes_remat_from_the_run_config_not_the_model_config():
    """A library user who sets remat on TrainConfig and loads the model without it gets rematerialisation (the
    run's config is the one home of remat and attention), and none when the run says none."""
    import dataclasses

    assert MCFG.remat == "none"
    remat = re.compile(r"= (remat\d*|checkpoint)\[")  # jax.checkpoint's primitive, as jaxprs print it
    assert remat.search(_step_jaxpr(_cfg(remat="dots"), MCFG))
    assert not remat.search(_step_jaxpr(_cfg(remat="none"), dataclasses.replace(MCFG, remat="full")))


def test_a_model_config_with_another_compute_dtype_than_the_run_is_refused():
    import dataclasses

    with pytest.raises(ValueError, match="the run's dtype=float32 but the model was loaded with dtype=bfloat16"):
        make_train_step(_cfg(dtype="float32"), dataclasses.replace(MCFG, dtype="bfloat16"), None, prompt_len=P)
    with pytest.raises(ValueError, match="the run's dtype=bfloat16 but the model was loaded with dtype=float32"):
        make_train_step(_cfg(dtype="bfloat16"), MCFG, None, prompt_len=P)


@pytest.mark.parametrize("members,micro", [(1, 1), (3, 2)])
def test_the_steps_gap_metrics_equal_a_separate_rescore(members, micro):
    """``GAP_METRICS`` from the step's own forwards (accumulated over micro-batches) equal a separate re-score of
    the batch before the update: each member's forward (``adapter_params``) and, for an ensemble, the merged
    ensemble (``ensemble_params``), which the step scores only on a ``phase_start`` batch."""
    cfg = _cfg(lora_rank=2, ensemble_size=members, micro_batches=micro, reference="sft")
    state = st.create_state(cfg, _base(), jax.random.key(1))
    trainable = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), state.trainable)
    state = state.replace(trainable=trainable, behavior=st.take_behavior(cfg, trainable, state.base))
    batch = {k: jnp.asarray(v) for k, v in _batch(st.behavior_params(cfg, state)).items() if k in BATCH_KEYS}

    def gaps(params):
        pc, pr, _, _ = pair_logps(MCFG, params, batch, P)
        return np.abs(np.concatenate([pc - batch["chosen_behavior_logps"], pr - batch["rejected_behavior_logps"]]))

    members_ = [gaps(st.adapter_params(cfg, state.base, jax.tree.map(lambda x: x[i], trainable)))
                for i in range(members)]
    policy = members_[0] if members == 1 else gaps(st.ensemble_params(cfg, state.base, trainable))
    assert policy.max() < 1e-4 and (members == 1 or max(g.max() for g in members_) > 1e-2)  # the members ≠ π_β
    fresh = lambda: jax.tree.map(jnp.copy, state)  # noqa: E731  the step donates its state
    _, m = _step(cfg, fresh(), {**batch, PHASE_START_KEY: jnp.ones(B)})
    np.testing.assert_allclose(float(m["policy_behavior_logp_gap"]), policy.max(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(m["policy_behavior_logp_gap_mean"]), policy.mean(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(m["member_logp_gap_max"]), max(g.max() for g in members_), rtol=1e-4)
    if members > 1:  # not a phase start: the merged forward does not run
        _, m = _step(cfg, fresh(), batch)
        assert float(m["policy_behavior_logp_gap"]) == 0.0
        np.testing.assert_allclose(float(m["member_logp_gap_max"]), max(g.max() for g in members_), rtol=1e-4)


@pytest.mark.slow
def test_discopop_tau_reaches_the_loss():
    """DiscoPOP's τ only acts once the policy has moved (at h = 0 the loss is ½·log 2 + ½ for any τ): the first
    step's loss agrees across τ, the second's differs."""
    losses = {}
    for tau in (0.05, 5.0):
        cfg = _cfg(loss_type="discopop", discopop_tau=tau)
        state = st.create_state(cfg, _base(), jax.random.key(1))
        batch = _batch(st.behavior_params(cfg, state))
        state, m1 = _step(cfg, state, batch)
        _, m2 = _step(cfg, state, batch)
        losses[tau] = (float(m1["loss"]), float(m2["loss"]))
    np.testing.assert_allclose(losses[0.05][0], 0.5 * LOG2 + 0.5, atol=1e-5)
    np.testing.assert_allclose(losses[0.05][0], losses[5.0][0], atol=1e-6)
    assert abs(losses[0.05][1] - losses[5.0][1]) > 1e-4


def test_full_ft_keeps_pi_beta_in_the_compute_dtype_and_resumes_an_older_float32_copy(tmp_path):
    """Full fine-tuning keeps π_β as the one model in the compute dtype (matrices bfloat16, norms float32, no
    ensemble axis), sharded like the base, and samples with it as it is. A checkpoint written when ``behavior``
    was the float32 masters with their ensemble axis is restored as written and cast on resume: the same π_β."""
    from bpo_jax.train.checkpoint import Checkpointer

    cfg = _cfg(lora_rank=0, ensemble_size=1)
    mesh = shd.make_mesh(data=1, fsdp=4, tensor=2)
    base = shd.shard(_base(), shd.logical_to_sharding(param_axes(MCFG), _base(), mesh))
    fresh = lambda: st.committed(st.create_state(cfg, base, jax.random.key(1), compute_dtype="bfloat16"))  # noqa: E731
    state = fresh()
    want = st.ensemble_params(cfg, base, state.trainable, "bfloat16")
    assert state.behavior["layers"]["q"].dtype == jnp.bfloat16 and state.behavior["final_norm"].dtype == jnp.float32
    for got, w, b in zip(jax.tree.leaves(state.behavior), jax.tree.leaves(want), jax.tree.leaves(base), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(w))
        assert got.sharding.is_equivalent_to(b.sharding, got.ndim)
    assert st.behavior_params(cfg, state, "bfloat16")["layers"]["q"] is state.behavior["layers"]["q"]  # no copy
    policy = st.policy_params(cfg, state, "bfloat16")  # π_θ as evaluated: the same cast, one program, no x[0]
    for got, w, b in zip(jax.tree.leaves(policy), jax.tree.leaves(want), jax.tree.leaves(base), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(w))
        assert got.dtype == w.dtype and got.sharding.is_equivalent_to(b.sharding, got.ndim)
    masters = jax.tree.map(lambda x: x + 0.25, state.trainable)  # π_β's masters at the last sync
    ckpt = Checkpointer(str(tmp_path), keep=2)
    ckpt.save(3, state.replace(behavior=masters), None, {})
    restored = ckpt.restore(3, fresh())[0]
    assert jax.tree.map(jnp.shape, restored.behavior) == jax.tree.map(jnp.shape, state.trainable)
    cast = st.merge_legacy_behavior(cfg, restored, "bfloat16")
    jax.tree.map(lambda g, w: np.testing.assert_array_equal(np.asarray(g), np.asarray(w)), cast.behavior,
                 st.ensemble_params(cfg, base, masters, "bfloat16"))
    assert st.merge_legacy_behavior(cfg, cast, "bfloat16") is cast
    ckpt.save(4, cast, None, {})  # the bfloat16 π_β round-trips as it is
    again = ckpt.restore(4, fresh())[0].behavior
    jax.tree.map(lambda g, w: np.testing.assert_array_equal(np.asarray(g), np.asarray(w)), again, cast.behavior)
    assert jax.tree.map(lambda x: x.dtype, again) == jax.tree.map(lambda x: x.dtype, cast.behavior)
    assert again["layers"]["q"].dtype == jnp.bfloat16
    ckpt.close()
