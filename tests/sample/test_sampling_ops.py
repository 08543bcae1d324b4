"""Per-step sampling: empirical frequencies follow softmax(logits/T), top-k/top-p truncate, log-probs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bpo_jax.sample.ops import sample_step, sampling_log_probs

LOGITS = jnp.asarray([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]], jnp.float32)


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _chi_square_ok(counts, probs, n):
    """Pearson chi-square over the supported categories, against the 0.999 quantile (df ≤ 5 → 20.5)."""
    support = probs > 0
    assert counts[~support].sum() == 0, "sampled a token outside the support"
    expected = probs[support] * n
    stat = float((((counts[support] - expected) ** 2) / expected).sum())
    return stat < 20.5, stat


def _draw(n, **kw):
    keys = jax.random.split(jax.random.key(0), n)
    toks = jax.jit(jax.vmap(lambda k: sample_step(k, LOGITS, **kw)[0][0]))(keys)
    return np.bincount(np.asarray(toks), minlength=LOGITS.shape[1])


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_frequencies_follow_tempered_softmax(temperature):
    n = 20000
    counts = _draw(n, temperature=temperature)
    ok, stat = _chi_square_ok(counts, _softmax(np.asarray(LOGITS[0]) / temperature), n)
    assert ok, stat


def test_top_k_and_top_p_truncate():
    n = 20000
    base = _softmax(np.asarray(LOGITS[0]))
    # top-k = 3: renormalised over the three largest logits.
    p = np.where(np.arange(6) < 3, base, 0.0)
    ok, stat = _chi_square_ok(_draw(n, temperature=1.0, top_k=3), p / p.sum(), n)
    assert ok, stat
    # top-p = 0.8: the smallest prefix (by probability) whose mass reaches 0.8.
    cum_before = np.cumsum(base) - base
    keep = cum_before < 0.8
    assert 1 < keep.sum() < 6
    p = np.where(keep, base, 0.0)
    ok, stat = _chi_square_ok(_draw(n, temperature=1.0, top_p=0.8), p / p.sum(), n)
    assert ok, stat
    # A tiny top-p keeps the single most likely token.
    assert _draw(200, temperature=1.0, top_p=1e-6)[0] == 200


def test_sampling_log_probs_values():
    lp = np.asarray(sampling_log_probs(LOGITS, temperature=0.5, top_k=2))[0]
    x = np.asarray(LOGITS[0])[:2] / 0.5
    np.testing.assert_allclose(lp[:2], x - np.log(np.exp(x).sum()), rtol=1e-5)
    assert np.all(np.isneginf(lp[2:]))
    greedy = np.asarray(sampling_log_probs(LOGITS, temperature=0.0))[0]
    assert greedy[0] == 0.0 and np.all(np.isneginf(greedy[1:]))


def test_sample_step_returns_untempered_and_sampling_logprobs():
    logits = jnp.tile(LOGITS, (4, 1))
    toks, model_lp, sample_lp = sample_step(jax.random.key(1), logits, temperature=0.7, top_k=4)
    full = np.asarray(jax.nn.log_softmax(LOGITS[0]))
    proc = np.asarray(sampling_log_probs(LOGITS, temperature=0.7, top_k=4))[0]
    np.testing.assert_allclose(model_lp, full[np.asarray(toks)], rtol=1e-6)
    np.testing.assert_allclose(sample_lp, proc[np.asarray(toks)], rtol=1e-6)
    g_tok, g_lp, g_slp = sample_step(jax.random.key(1), logits, temperature=0.0)
    np.testing.assert_array_equal(g_tok, 0)
    np.testing.assert_allclose(g_lp, full[0], rtol=1e-6)
    np.testing.assert_array_equal(g_slp, 0.0)
