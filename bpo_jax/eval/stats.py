"""The statistics of a comparison between methods, pure NumPy (the experiment runner, ``compare`` and
``bench/grid_power.py`` share them):

- ``outcomes``: a response against the human reference, 1 where it beats it strictly, else 0 (a tie loses, as
  in the paper);
- ``head_to_head_outcomes``: two methods' responses against each other, +1 / −1 / 0 by the higher score;
- ``summarize_seeds``: the mean ± sample std of the seeds' win rates;
- ``paired_bootstrap``: the difference of two methods' mean outcomes on the same prompts and seeds, with a
  percentile CI from one bootstrap draw of seeds and prompts (or groups of prompts) shared by both;
- ``head_to_head``: the shares of A wins, B wins and ties, and P(A wins) − P(B wins) with ``paired_bootstrap``'s
  CI on the two sides' win indicators.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


def outcomes(scores, reference_scores) -> np.ndarray:
    """1 where the response beats the reference strictly, else 0 (a tie loses, as in the paper)."""
    return (np.asarray(scores) > np.asarray(reference_scores)).astype(np.float64)


def head_to_head_outcomes(scores_a, scores_b) -> np.ndarray:
    """+1 where A's response scores higher than B's, −1 where lower, 0 on equal scores (any shape)."""
    return np.sign(np.asarray(scores_a, np.float64) - np.asarray(scores_b, np.float64))


class SeedSummary(NamedTuple):
    mean: float
    std: float  # sample standard deviation over seeds (0 for one seed)


def summarize_seeds(win_rates) -> SeedSummary:
    w = np.asarray(win_rates, np.float64)
    return SeedSummary(float(w.mean()), float(w.std(ddof=1)) if w.size > 1 else 0.0)


class PairedDiff(NamedTuple):
    diff: float  # mean(a) - mean(b) over every (seed, prompt)
    ci_low: float
    ci_high: float
    p_value: float  # two-sided: twice the smaller bootstrap tail beyond 0 (capped at 1)
    n_prompts: int
    n_seeds: int
    discordance: float  # share of (seed, prompt) outcomes where the two methods differ
    n_groups: int  # the units the bootstrap resampled: n_prompts, or the number of prompt groups


def paired_bootstrap(a, b, *, groups=None, num_bootstrap: int = 2000, seed: int = 0,
                     chunk: int = 250) -> PairedDiff:
    """Win-rate difference of two methods scored on the same prompts, ``a`` and ``b``: outcomes ``[seeds,
    prompts]`` (a 1-D array is one seed), row k of both from seed k. Each bootstrap replicate draws seeds and
    prompts with replacement, the same draw for both methods (and the same prompts for every seed), so what
    the prompts share (their difficulty) cancels out of the difference. Percentile 95% CI.

    ``groups``: one label per prompt (e.g. minisum's template). Prompts of a group are then drawn together: a
    replicate draws as many groups as there are, with replacement, and takes every prompt of each (the
    cluster bootstrap), and its mean is over the prompts drawn. When outcomes go by group this CI is the honest
    one; with few groups (minisum's 8) it still runs narrow, as a bootstrap over few clusters does. With one
    prompt per group it is the prompt bootstrap, draw for draw."""
    a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired outcomes need the same [seeds, prompts] shape, got {a.shape} and {b.shape}")
    d = a - b
    S, N = d.shape
    if groups is None:
        labels = np.arange(N)
    elif len(groups) != N:
        raise ValueError(f"{len(groups)} group labels for {N} prompts")
    else:
        labels = np.unique(np.asarray(groups), return_inverse=True)[1].reshape(N)
    G = int(labels.max()) + 1
    sums = np.stack([np.bincount(labels, weights=row, minlength=G) for row in d])  # [S, G]: each group's total
    sizes = np.bincount(labels, minlength=G).astype(np.float64)
    rng = np.random.default_rng(seed)
    boots = []
    for start in range(0, num_bootstrap, chunk):
        m = min(chunk, num_bootstrap - start)
        si, gi = rng.integers(0, S, (m, S)), rng.integers(0, G, (m, G))
        counts = np.zeros((m, G))
        np.add.at(counts, (np.arange(m)[:, None], gi), 1.0)  # how often each group is drawn
        per_seed = np.einsum("rg,rsg->rs", counts, sums[si]) / (counts @ sizes)[:, None]
        boots.append(per_seed.mean(axis=1))
    boot = np.concatenate(boots)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    p = min(1.0, 2 * min((boot <= 0).mean(), (boot >= 0).mean()))
    return PairedDiff(float(d.mean()), float(lo), float(hi), float(p), N, S, float((d != 0).mean()), G)


def head_to_head(outcome, **bootstrap_kw) -> dict:
    """From per-prompt outcomes (+1 A wins, −1 B wins, 0 tie; ``[seeds, prompts]`` or one seed's prompts): the
    shares of each, and ``diff`` = P(A wins) − P(B wins) with its paired bootstrap 95% CI and two-sided p-value."""
    o = np.asarray(outcome, np.float64)
    wins_a, wins_b = (o > 0).astype(np.float64), (o < 0).astype(np.float64)
    d = paired_bootstrap(wins_a, wins_b, **bootstrap_kw)
    return {"a_wins": float(wins_a.mean()), "b_wins": float(wins_b.mean()), "ties": float((o == 0).mean()),
            "diff": d.diff, "ci_low": d.ci_low, "ci_high": d.ci_high, "p_value": d.p_value}
