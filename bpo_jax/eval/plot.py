"""``python -m bpo_jax plot RUN_DIR [RUN_DIR ...] [--out FILE]``: win rate (with its 95% CI band) and loss
against step, one line per run (e.g. offline vs on-policy vs BPO), from each run's ``metrics.jsonl``."""

from __future__ import annotations

import argparse
import logging
import os

import numpy as np

log = logging.getLogger(__name__)


def load_series(run_dir: str) -> dict[str, np.ndarray]:
    """``{"loss_step", "loss", "eval_step", "win_rate", "ci_low", "ci_high"}`` from ``run_dir/metrics.jsonl``.
    A resumed run may log a step twice; the last record of a step wins."""
    from bpo_jax.runtime import run_dir as rd  # local or gs:// run directories

    path = rd.path(run_dir, "metrics.jsonl")
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (is {run_dir!r} a bpo_jax run directory?)")
    losses, evals = {}, {}
    for rec in rd.read_jsonl(path):  # a last line cut short (a run still writing it) is left out
        if "loss" in rec:
            losses[rec["step"]] = rec["loss"]
        if "eval/win_rate" in rec:
            evals[rec["step"]] = (rec["eval/win_rate"], rec["eval/ci_low"], rec["eval/ci_high"])
    ls, es = sorted(losses), sorted(evals)
    ev = np.asarray([evals[s] for s in es], np.float64).reshape(-1, 3)
    return {"loss_step": np.asarray(ls), "loss": np.asarray([losses[s] for s in ls]), "eval_step": np.asarray(es),
            "win_rate": ev[:, 0], "ci_low": ev[:, 1], "ci_high": ev[:, 2]}


def plot_runs(run_dirs, out: str, labels=None) -> dict[str, dict[str, np.ndarray]]:
    """Write the PNG; return the plotted series per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    data = {label: load_series(d) for label, d in zip(labels, run_dirs)}
    fig, (ax_w, ax_l) = plt.subplots(1, 2, figsize=(11, 4))
    for label, s in data.items():
        line, = ax_w.plot(s["eval_step"], 100 * s["win_rate"], marker="o", label=label)
        ax_w.fill_between(s["eval_step"], 100 * s["ci_low"], 100 * s["ci_high"], color=line.get_color(), alpha=0.2)
        ax_l.plot(s["loss_step"], s["loss"], label=label)
    ax_w.set(xlabel="step", ylabel="win rate vs references (%)", title="Win rate (95% bootstrap CI)")
    ax_l.set(xlabel="step", ylabel="DAP loss", title="Training loss")
    for ax in (ax_w, ax_l):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    from etils import epath

    with epath.Path(out).open("wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bpo_jax plot", description=__doc__)
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", help="PNG path (default: <first run_dir>/plot.png)")
    p.add_argument("--labels", nargs="*", help="one label per run (default: the run directory names)")
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.run_dirs):
        p.error(f"{len(args.labels)} labels for {len(args.run_dirs)} runs")
    out = args.out or os.path.join(args.run_dirs[0], "plot.png")
    from bpo_jax.runtime import logs

    logs.setup()
    plot_runs(args.run_dirs, out, args.labels)
    log.info(out)
    return 0
