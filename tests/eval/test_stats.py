"""The comparison statistics (``bpo_jax.eval.stats``): the paired bootstrap against known answers and the normal
approximation, the seeds' summary, head to head in closed form."""

import numpy as np
import pytest

from bpo_jax.eval.stats import head_to_head, head_to_head_outcomes, outcomes, paired_bootstrap, summarize_seeds


def test_paired_bootstrap_known_difference_and_ci():
    a = np.array([1, 1, 1, 1, 0, 1, 0, 1, 1, 0], float)  # 7 / 10
    b = np.array([1, 0, 1, 0, 0, 1, 0, 0, 1, 0], float)  # 4 / 10
    d = paired_bootstrap(a, b)
    assert d.diff == pytest.approx(0.3) and d.ci_low <= 0.3 <= d.ci_high and (d.n_prompts, d.n_seeds) == (10, 1)
    d4 = paired_bootstrap(np.tile(a, 16), np.tile(b, 16))  # 16x the prompts: a CI about 4x narrower
    assert d4.diff == pytest.approx(0.3) and d4.ci_low <= 0.3 <= d4.ci_high
    assert 0.15 < (d4.ci_high - d4.ci_low) / (d.ci_high - d.ci_low) < 0.4
    assert paired_bootstrap(a, a) == (0.0, 0.0, 0.0, 1.0, 10, 1, 0.0, 10)  # identical outcomes: no difference at all

    # Against the normal approximation: one seed, n paired Bernoulli outcomes, CI ≈ diff ± 1.96 sd(a - b) / √n.
    rng = np.random.default_rng(0)
    n = 20000
    a = (rng.random(n) < 0.6).astype(float)
    b = np.where(rng.random(n) < 0.7, a, (rng.random(n) < 0.5).astype(float))  # correlated with a
    d = paired_bootstrap(a, b, num_bootstrap=4000)
    half = 1.96 * np.std(a - b, ddof=1) / np.sqrt(n)
    assert d.diff == pytest.approx((a - b).mean())
    assert d.ci_low == pytest.approx(d.diff - half, abs=0.1 * half)
    assert d.ci_high == pytest.approx(d.diff + half, abs=0.1 * half)
    unpaired = 1.96 * np.sqrt(a.var() / n + b.var() / n)
    assert half < 0.8 * unpaired  # pairing removes what the two methods share

    # Several seeds: the point estimate is the mean over seeds and prompts; seeds are resampled too.
    a3, b3 = np.stack([a[:500], a[500:1000], a[1000:1500]]), np.stack([b[:500], b[500:1000], b[1000:1500]])
    d3 = paired_bootstrap(a3, b3)
    assert d3.diff == pytest.approx((a3 - b3).mean()) and d3.ci_low < d3.diff < d3.ci_high and d3.n_seeds == 3
    with pytest.raises(ValueError, match="same \\[seeds, prompts\\] shape"):
        paired_bootstrap(a3, b3[:2])


def test_grouped_bootstrap_resamples_whole_groups():
    # One prompt per group is the prompt bootstrap, draw for draw.
    rng = np.random.default_rng(1)
    a, b = (rng.random((3, 400)) < 0.8).astype(float), (rng.random((3, 400)) < 0.7).astype(float)
    assert paired_bootstrap(a, b, groups=[f"p{i:03d}" for i in range(400)]) == paired_bootstrap(a, b)
    # A difference held by one of 8 groups of 50 (minisum's 400 test prompts, a template won whole): a
    # replicate's difference is K/8 with K ~ Binomial(8, 1/8) the draws of that group, so the 2.5th percentile
    # is 0 (P(K = 0) = (7/8)^8 = 0.34) and the 97.5th 3/8 (P(K <= 2) = 0.933, P(K <= 3) = 0.989); the prompt
    # bootstrap's CI is a narrow one around 1/8.
    groups = np.repeat([f"template{k}" for k in range(8)], 50)
    a, b = (groups == "template3").astype(float), np.zeros(400)
    d = paired_bootstrap(a, b, groups=groups)
    assert (d.diff, d.ci_low, d.ci_high, d.n_groups, d.n_prompts) == (0.125, 0.0, 0.375, 8, 400)
    assert d.p_value == pytest.approx(2 * (7 / 8) ** 8, abs=0.05)
    flat = paired_bootstrap(a, b)
    assert 0.08 < flat.ci_low < flat.ci_high < 0.17 and flat.p_value == 0.0
    # The labels name the groups; their order and the prompts' order within the arrays do not matter.
    perm = rng.permutation(400)
    shuffled = paired_bootstrap(a[perm], b[perm], groups=groups[perm])
    assert shuffled[:3] == pytest.approx(tuple(d[:3]))
    # Groups of unequal size: a replicate's mean is over the prompts it drew.
    g = np.array([0] * 9 + [1])
    one = paired_bootstrap(np.ones(10), np.zeros(10), groups=g)
    assert (one.diff, one.ci_low, one.ci_high) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="9 group labels for 10 prompts"):
        paired_bootstrap(np.ones(10), np.zeros(10), groups=g[:9])
    # head_to_head passes the groups on.
    h = head_to_head(np.where(groups == "template3", 1.0, 0.0), groups=groups)
    assert (h["diff"], h["ci_low"], h["ci_high"]) == (0.125, 0.0, 0.375)


def test_seed_summary():
    assert summarize_seeds([0.5, 0.7, 0.6]) == pytest.approx((0.6, 0.1))
    assert summarize_seeds([0.4]) == (0.4, 0.0)


def test_head_to_head_closed_form():
    out = head_to_head([1, 1, 1, -1, 0, 0, 1, -1], num_bootstrap=500)
    assert (out["a_wins"], out["b_wins"], out["ties"]) == (0.5, 0.25, 0.25)
    assert out["diff"] == pytest.approx(0.25) and out["ci_low"] <= 0.25 <= out["ci_high"]
    # The difference and its CI are the paired bootstrap of the two sides' win indicators.
    ref = paired_bootstrap([1, 1, 1, 0, 0, 0, 1, 0], [0, 0, 0, 1, 0, 0, 0, 1], num_bootstrap=500)
    assert (out["ci_low"], out["ci_high"], out["p_value"]) == (ref.ci_low, ref.ci_high, ref.p_value)
    ties = head_to_head(np.zeros(5))
    assert (ties["diff"], ties["ci_low"], ties["ci_high"], ties["ties"], ties["p_value"]) == (0, 0, 0, 1, 1)


def test_head_to_head_over_seeds_and_outcomes_from_scores():
    sa = np.array([[0.5, 0.2, 0.3, 0.3], [0.1, 0.9, 0.4, 0.0]])  # [seeds, prompts]
    sb = np.array([[0.4, 0.2, 0.6, 0.1], [0.1, 0.2, 0.5, 0.3]])
    o = head_to_head_outcomes(sa, sb)
    np.testing.assert_array_equal(o, [[1, 0, -1, 1], [0, 1, -1, -1]])
    out = head_to_head(o, num_bootstrap=500)
    assert (out["a_wins"], out["b_wins"], out["ties"]) == (3 / 8, 3 / 8, 2 / 8) and out["diff"] == 0
    # Seeds are resampled with the prompts: the same as the paired bootstrap of the [seeds, prompts] indicators.
    ref = paired_bootstrap((o > 0).astype(float), (o < 0).astype(float), num_bootstrap=500)
    assert (out["ci_low"], out["ci_high"], out["p_value"]) == (ref.ci_low, ref.ci_high, ref.p_value)
    assert ref.n_seeds == 2 and out["ci_low"] < 0 < out["ci_high"]


def test_outcomes_count_a_tie_as_a_loss():
    np.testing.assert_array_equal(outcomes([0.5, 0.4, 0.3], [0.4, 0.4, 0.6]), [1.0, 0.0, 0.0])
