"""The official code's mechanics as options: ``response_eos=append`` (every sampled response ends with an EOS,
with π_β's own log-prob for it) and ``identical_pairs=shrink`` (dropped pairs masked; a step's loss and gradient
are those of its kept pairs alone), their config checks, and the ``phase_start`` flag in metrics.jsonl."""

import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bpo_jax.config import TrainConfig
from bpo_jax.config.groups import ConfigError
from bpo_jax.models import init_params
from bpo_jax.sample.sampler import Decoding, cut_off, generate
from bpo_jax.train import state as st
from bpo_jax.train.pairs import build_pairs
from bpo_jax.train.step import BATCH_KEYS, GAP_METRICS, WEIGHT_KEY, make_train_step, pair_logps
from testing import full_forward_logprobs, random_pair_batch, tiny_model_config

MCFG = tiny_model_config()
P, N, B = 5, 4, 8
EOS = tuple(range(3, 40))  # many stop tokens: some responses end by themselves within N tokens, some do not
LOG2 = float(np.log(2.0))


def _prompts(rows=B, seed=0):
    rng = np.random.default_rng(seed)
    ids, mask = rng.integers(3, 96, (rows, P)).astype(np.int32), np.ones((rows, P), np.int32)
    ids[0, :2], mask[0, :2] = 0, 0  # one left-padded prompt
    return ids, mask


def _sample(params, append, seed=3):
    ids, mask = _prompts()
    decoding = Decoding(max_new_tokens=N, num_samples=2, eos_token_ids=EOS, append_eos=append)
    return ids, mask, generate(params, ids, mask, decoding, config=MCFG, rng=jax.random.key(seed))


def test_append_ends_every_response_with_an_eos_whose_logp_is_pi_betas():
    params = init_params(MCFG, jax.random.key(0))
    ids, pmask, out = _sample(params, append=True)
    _, _, raw = _sample(params, append=False)
    assert out.tokens.shape == (2 * B, N + 1)  # static: one more column than max_new_tokens
    # the same draws as response_eos=sampled, one forced EOS column added
    np.testing.assert_array_equal(out.tokens[:, :N], raw.tokens)
    np.testing.assert_array_equal(out.logprobs[:, :N], raw.logprobs)
    length = out.mask.sum(1)
    last = out.tokens[np.arange(2 * B), length - 1]
    assert np.isin(last, EOS).all()  # every response ends with an EOS
    truncated = np.isin(raw.tokens, EOS).sum(1) == 0
    assert 0 < truncated.sum() < 2 * B  # both kinds occur
    assert (length[truncated] == N + 1).all() and (last[truncated] == EOS[0]).all()
    assert (length[~truncated] <= N).all() and (out.mask[~truncated, N] == 0).all()
    assert (out.sampling_logprobs[truncated, N] == 0).all()
    # the appended EOS's behavior log-prob is the one a full forward of π_β gives it
    rep = np.repeat(ids, 2, axis=0), np.repeat(pmask, 2, axis=0)
    full = full_forward_logprobs(SimpleNamespace(config=MCFG, params=params), *rep, jnp.asarray(out.tokens),
                                 jnp.asarray(out.mask))
    np.testing.assert_allclose(out.logprobs, np.asarray(full), atol=1e-5)
    assert (out.logprobs[truncated, N] < 0).all()
    pairs = build_pairs(ids, pmask, out.tokens, out.mask, out.logprobs, np.arange(2 * B, dtype=np.float32),
                        np.ones(B, bool), EOS, eos_appended=True)
    np.testing.assert_array_equal(pairs["truncated"], 0.5 * (truncated[0::2] + truncated[1::2]))


def test_append_needs_an_eos_id():
    with pytest.raises(ValueError, match="append_eos needs an EOS token id"):
        Decoding(max_new_tokens=4, append_eos=True)


def _cfg(**kw):
    base = dict(total_steps=4, num_phases=2, batch_size=B, lora_rank=2, lora_alpha=4, max_new_tokens=N,
                learning_rate=1.0, adam_eps=1.0, max_grad_norm=1e9, share_prompt=False)
    return TrainConfig(**{**base, **kw})


@pytest.mark.slow
def test_append_gives_h_zero_when_pi_beta_is_pi_theta():
    """A phase start under ``reference=behavior`` with appended EOS tokens: the policy's forward re-scores each
    response (its forced EOS included) as the sampler did, so h = 0 and the loss is log 2."""
    cfg = _cfg(response_eos="append")
    state = st.create_state(cfg, init_params(MCFG, jax.random.key(0)), jax.random.key(1))
    ids, pmask, out = _sample(st.behavior_params(cfg, state), append=True)
    assert (out.mask[:, N] == 1).any()
    pairs = build_pairs(ids, pmask, out.tokens, out.mask, out.logprobs, np.arange(2 * B, dtype=np.float32),
                        np.ones(B, bool), EOS, eos_appended=True)
    batch = {k: jnp.asarray(pairs[k]) for k in (*BATCH_KEYS, WEIGHT_KEY)}
    policy = st.adapter_params(cfg, state.base, jax.tree.map(lambda x: x[0], state.trainable))
    pc, pr, _, _ = pair_logps(MCFG, policy, batch, P)
    np.testing.assert_allclose(pc, pairs["chosen_behavior_logps"], atol=1e-5)
    np.testing.assert_allclose(pr, pairs["rejected_behavior_logps"], atol=1e-5)
    _, m = make_train_step(cfg, MCFG, st.shardings(state), prompt_len=P)(state, batch)
    np.testing.assert_allclose(float(m["loss"]), LOG2, atol=1e-5)
    assert abs(float(m["logits"])) < 1e-4


def test_build_pairs_shrink_keeps_every_row_and_weights_the_dropped_ones_zero():
    tokens = np.array([[5, 6], [5, 6], [7, 8], [9, 9], [4, 4], [3, 3]])
    keep = np.array([False, True, False])
    args = (np.zeros((3, 2), int), np.ones((3, 2), int), tokens, np.ones((6, 2), int), -np.ones((6, 2)),
            np.array([0.0, 0.0, 1.0, 2.0, 5.0, 3.0]), keep)
    shrunk, resampled = build_pairs(*args, shrink=True), build_pairs(*args)
    assert len(shrunk["weight"]) == 3 and shrunk["weight"].tolist() == [0.0, 1.0, 0.0]
    assert resampled["weight"].tolist() == [1.0]
    for k in resampled:
        np.testing.assert_array_equal(shrunk[k][1:2], resampled[k])  # the kept row is the same pair either way


def test_cut_off_is_a_response_that_filled_its_columns_without_ending():
    """Rows: ended early (mask 0 after its EOS), ended with an EOS in the last column, filled without one; with
    ``eos_appended`` a row that fills the extra last column was cut off (its EOS is the forced one)."""
    tokens = np.array([[5, 2, 0], [5, 6, 2], [5, 6, 7]])
    mask = np.array([[1, 1, 0], [1, 1, 1], [1, 1, 1]])
    assert cut_off(tokens, mask, (2,)).tolist() == [False, False, True]
    assert cut_off(tokens, mask, (2, 7)).tolist() == [False, False, False]  # any of the EOS ids ends it
    assert cut_off(tokens, mask, (2,), eos_appended=True).tolist() == [False, True, True]


def _trainable_delta(cfg, batch, micro=1):
    """One train step from a fresh state with B ≠ 0 (so the gradient reaches both factors): (metrics, Δ params,
    new state)."""
    cfg = cfg.replace(micro_batches=micro)
    state = st.create_state(cfg, init_params(MCFG, jax.random.key(0)), jax.random.key(1))
    state = state.replace(trainable=jax.tree.map(lambda x: x + 0.05, state.trainable))
    before = jax.tree.map(np.asarray, state.trainable)
    new, m = make_train_step(cfg, MCFG, st.shardings(state), prompt_len=P)(state, batch)
    delta = jax.tree.map(lambda a, b: np.asarray(a) - b, new.trainable, before)
    return {k: float(v) for k, v in m.items()}, delta, new


@pytest.mark.slow
@pytest.mark.parametrize("micro", [1, 2])
def test_shrink_step_equals_the_step_on_the_kept_pairs_alone(micro):
    """Weights [1, 0, 1, 1, 0, 1, 1, 0]: loss, metrics, gradient norm and update equal those of the same step on
    the 5 kept pairs (no weight key), whatever the masked rows hold; a batch with no kept pair changes nothing."""
    cfg = _cfg(batch_size=B, identical_pairs="shrink", reference="sft")
    batch = random_pair_batch(0, B, P, N, MCFG.vocab_size)
    w = np.array([1, 0, 1, 1, 0, 1, 1, 0], np.float32)
    kept = {k: v[w == 1] for k, v in batch.items()}
    junk = random_pair_batch(9, B, P, N, MCFG.vocab_size)  # the masked rows: other pairs entirely
    weighted = {k: jnp.where((w == 1).reshape(-1, *[1] * (v.ndim - 1)), v, junk[k]) for k, v in batch.items()}
    want_m, want_d, _ = _trainable_delta(cfg.replace(batch_size=5), kept)
    got_m, got_d, _ = _trainable_delta(cfg, {**weighted, WEIGHT_KEY: jnp.asarray(w)}, micro)
    assert got_m["pairs_kept"] == 5 and want_m["pairs_kept"] == 5
    for k in want_m:  # the gap checks score every row the sampler produced, masked or not (step.GAP_METRICS)
        if k != "learning_rate" and k not in GAP_METRICS:
            np.testing.assert_allclose(got_m[k], want_m[k], rtol=1e-6, atol=1e-6, err_msg=k)
    assert want_m["grad_norm"] > 1e-3
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got_d, want_d)

    m, delta, new = _trainable_delta(cfg, {**weighted, WEIGHT_KEY: jnp.zeros(B)}, micro)
    assert m["pairs_kept"] == 0 and m["loss"] == 0.0 and int(new.step) == 1
    assert all(not np.any(d) for d in jax.tree.leaves(delta))


def test_config_keys_are_checked():
    cfg = TrainConfig()
    assert (cfg.response_eos, cfg.identical_pairs) == ("sampled", "resample")  # today's behaviour by default
    with pytest.raises(ConfigError, match="response_eos='eos'; valid: sampled, append"):
        TrainConfig(response_eos="eos")
    with pytest.raises(ConfigError, match="identical_pairs='drop'; valid: resample, shrink"):
        TrainConfig(identical_pairs="drop")
    for loss in ("aot", "bco_pair_batchmean"):  # masked rows would enter the batch's sort or mean
        with pytest.raises(ConfigError, match=f"loss_type={loss} couples the pairs of a batch.*identical_pairs"):
            TrainConfig(identical_pairs="shrink", loss_type=loss)
    TrainConfig(identical_pairs="resample", loss_type="aot")


def test_paper_configs_turn_the_official_mechanics_on():
    from bpo_jax.config import load_config
    from bpo_jax.config.train_config import validate_for_model

    for task in ("tldr", "hh_helpful", "hh_harmless"):
        cfg = load_config(f"configs/{task}_gemma2b.yaml")
        assert (cfg.response_eos, cfg.identical_pairs) == ("append", "shrink")
    cfg = TrainConfig(max_prompt_length=8, max_new_tokens=8, eval_max_new_tokens=4)
    validate_for_model(cfg, 96, 16)
    with pytest.raises(ConfigError, match="17 positions, more than the model's 16"):
        validate_for_model(cfg.replace(response_eos="append"), 96, 16)  # the appended EOS takes one position


@pytest.mark.slow
def test_loop_with_shrink_and_append_trains_on_the_kept_pairs_of_its_own_prompts(tiny_policy_and_rm, tmp_path,
                                                                                 monkeypatch):
    """The loop under the official mechanics: each phase samples exactly its K·B prompts (nothing resampled);
    the pairs the annotator ties (tied_pairs=drop) are masked, and each step reports how many it trained on;
    every response ends with an EOS; ``phase_start`` marks each phase's first step, where the loss is log 2."""
    from bpo_jax.data.minisum import encode_prompts
    from bpo_jax.data.prompts import ArrayPrompts
    from bpo_jax.eval.annotators import FunctionAnnotator
    from bpo_jax.models import load_pretrained
    from bpo_jax.train import loop
    from bpo_jax.wiring.tasks import training_run

    texts = [f"Tell me about topic number {i}, briefly." for i in range(12)]
    model, tok = load_pretrained(tiny_policy_and_rm[0])
    ids, mask = encode_prompts(tok, texts, 64)
    prompts = ArrayPrompts(texts, ids, mask, batch_size=4, seed=3)
    # prompts with an even topic number get equal scores: a tie, dropped under tied_pairs=drop
    score = lambda prompt, response: 0.0 if int(prompt.split()[5][:-1]) % 2 == 0 else len(response)  # noqa: E731
    cfg = TrainConfig(total_steps=4, num_phases=2, batch_size=4, max_new_tokens=3, learning_rate=5e-3, seed=3,
                      run_dir=str(tmp_path / "run"), identical_pairs="shrink", response_eos="append",
                      tied_pairs="drop", export_policy=False)
    seen, collect = [], loop.collect_pairs

    def spy(*a, **kw):
        pairs, stats = collect(*a, **kw)
        seen.append(pairs)
        return pairs, stats

    monkeypatch.setattr(loop, "collect_pairs", spy)
    loop.train(cfg, training_run(model, tok, prompts, FunctionAnnotator(score), eos_token_ids=(2,)))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase_start"] for r in records] == [1, 0, 1, 0]
    for r in records[0::2]:
        assert r["phase/prompts_sampled"] == 8 and r["phase/pairs_kept"] + r["phase/tied_pairs_dropped"] + \
            r["phase/identical_pairs_dropped"] == 8
        np.testing.assert_allclose(r["loss"], LOG2, atol=1e-5)
    for phase, pairs in enumerate(seen):
        assert pairs["chosen_ids"].shape[0] == 8  # K·B rows, the shapes fixed
        tiedpair = pairs["chosen_scores"] == pairs["rejected_scores"]
        np.testing.assert_array_equal(pairs["weight"], (~tiedpair).astype(np.float32))
        assert 0 < pairs["weight"].sum() < 8
        for side in ("chosen", "rejected"):
            response, n = pairs[f"{side}_ids"][:, -4:], pairs[f"{side}_mask"][:, -4:].sum(1)  # 3 new tokens + EOS
            assert (response[np.arange(8), n - 1] == 2).all()  # every response ends with the EOS
        for i in range(2):
            assert records[2 * phase + i]["pairs_kept"] == pairs["weight"][4 * i:4 * i + 4].sum()


@pytest.mark.slow
def test_loop_warns_when_most_pairs_are_identical(tiny_policy_and_rm, tmp_path, caplog):
    """Nearly greedy sampling gives the same text twice for every prompt: the phase says so, and how many."""
    from bpo_jax.data.minisum import encode_prompts
    from bpo_jax.data.prompts import ArrayPrompts
    from bpo_jax.eval.annotators import FunctionAnnotator
    from bpo_jax.models import load_pretrained
    from bpo_jax.train import loop
    from bpo_jax.wiring.tasks import training_run

    texts = [f"Tell me about topic number {i}, briefly." for i in range(4)]
    model, tok = load_pretrained(tiny_policy_and_rm[0])
    prompts = ArrayPrompts(texts, *encode_prompts(tok, texts, 64), batch_size=4, seed=3)
    cfg = TrainConfig(total_steps=1, num_phases=1, batch_size=4, max_new_tokens=3, temperature=1e-4, seed=3,
                      run_dir=str(tmp_path / "run"), identical_pairs="shrink", export_policy=False)
    with caplog.at_level("WARNING", logger="bpo_jax.train.loop"):
        loop.train(cfg, training_run(model, tok, prompts, FunctionAnnotator(lambda p, r: len(r)), eos_token_ids=(2,)))
    assert "phase 1: pi_beta sampled the same text twice for 4 of its 4 prompts" in caplog.text
