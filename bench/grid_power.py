"""Power of a paired win-rate comparison: how large a method difference a grid of P prompts x S seeds detects.

Simulates grids shaped like a measured one and runs the experiment runner's own paired bootstrap
(``bpo_jax.eval.stats.paired_bootstrap``) on each: method B wins a prompt with probability ``--base-rate``; the two
methods disagree on a fraction ``--discordance`` of the prompts, where A wins often enough that A - B is the
seed's difference, drawn per seed around the true difference with spread ``--seed-spread``. Prints, per
difference, the fraction of simulated grids whose 95% CI excludes 0 (the power).

With ``--groups G`` the prompts come in G groups (prompt i in group i mod G, as minisum's templates), each with
its own offset to the difference, drawn once per grid with spread ``--group-spread`` and shared by the seeds,
and the CI resamples whole groups (the report's columns marked groups). minisum_large's 8 templates spread BPO
F = 2 − offline by 8.5 points in the T = 64 grid (the std over templates of their mean difference).

    python bench/grid_power.py --prompts 400 --seeds 3 --discordance 0.05 0.1 0.2 --seed-spread 0.0155
    python bench/grid_power.py --prompts 400 --seeds 3 --discordance 0.1 --seed-spread 0.023 --groups 8 \
        --group-spread 0.085
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

from bpo_jax.eval.stats import paired_bootstrap

log = logging.getLogger("bench.grid_power")


def simulate(delta: float, discordance: float, spread: float, *, prompts: int, seeds: int, base_rate: float,
             rng: np.random.Generator, groups: int = 0, group_spread: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Outcomes ``[seeds, prompts]`` of methods A and B whose per-seed difference is ``delta`` + N(0, spread²),
    plus on each prompt its group's offset (``groups`` > 0: N(0, group_spread²) per group, the same on every
    seed)."""
    offset = (rng.normal(0, group_spread, groups)[np.arange(prompts) % groups] if groups else np.zeros(prompts))
    b = (rng.random((seeds, prompts)) < base_rate).astype(float)
    a = b.copy()
    for k in range(seeds):
        disagree, u = rng.random(prompts) < discordance, rng.random(prompts)
        a_wins = u < np.clip(0.5 + (delta + rng.normal(0, spread) + offset) / (2 * discordance), 0, 1)
        a[k, disagree], b[k, disagree] = a_wins[disagree], ~a_wins[disagree]
    return a, b


def power(delta, discordance, spread, *, grids: int, groups: int = 0, **kw) -> float:
    """The share of ``grids`` simulated grids whose 95% CI (over groups when ``groups``) lies above 0."""
    rng = np.random.default_rng(0)
    labels = np.arange(kw["prompts"]) % groups if groups else None
    found = sum(paired_bootstrap(*simulate(delta, discordance, spread, rng=rng, groups=groups, **kw),
                                 groups=labels, num_bootstrap=1000, seed=g).ci_low > 0 for g in range(grids))
    return found / grids


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=400)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--base-rate", type=float, default=0.67, help="method B's win rate")
    p.add_argument("--discordance", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    p.add_argument("--seed-spread", type=float, default=0.0155, help="std of the per-seed difference")
    p.add_argument("--deltas", type=float, nargs="+", default=[0.02, 0.03, 0.04, 0.05, 0.06, 0.08])
    p.add_argument("--grids", type=int, default=100, help="simulated grids per cell")
    p.add_argument("--groups", type=int, default=0, help="groups of prompts (0: every prompt on its own)")
    p.add_argument("--group-spread", type=float, default=0.0, help="std of a group's offset to the difference")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info("%d prompts x %d seeds, B's win rate %.2f, per-seed spread %.1f points%s; power = P(95%% CI > 0)",
             args.prompts, args.seeds, args.base_rate, 100 * args.seed_spread,
             f", {args.groups} groups resampled whole, spread {100 * args.group_spread:.1f} points" if args.groups
             else "")
    for pd in args.discordance:
        kw = dict(grids=args.grids, prompts=args.prompts, seeds=args.seeds, base_rate=args.base_rate,
                  groups=args.groups, group_spread=args.group_spread)
        row = [f"{100 * d:.0f}: {power(d, pd, args.seed_spread, **kw):.2f}" for d in args.deltas if d <= pd]
        log.info("disagree on %3.0f%% of prompts: difference (points): power  %s", 100 * pd, "  ".join(row))


if __name__ == "__main__":
    main()
