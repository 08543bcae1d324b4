"""``python -m bpo_jax experiment configs/experiments/<name>.yaml [--out-dir DIR] [--dry-run] [--report-only]``:
run a method × loss × seed grid of train runs under one budget, then write the comparison. The shared setting,
``base``, is train-config keys, a config file (``base: configs/tldr_gemma2b.yaml``, read from the current
directory), or both (``base: {config: configs/tldr_gemma2b.yaml, total_steps: 64}``).

Each run is ``python -m bpo_jax train`` in a subprocess (``run_dir = <out_dir>/<method>/<loss>/seed<k>``,
output in ``<run_dir>/experiment.log``), then ``python -m bpo_jax evaluate`` on its final checkpoint for the
per-prompt scores. Rerunning the command skips finished runs and resumes interrupted ones from their checkpoint.
Writes to ``out_dir``: ``results.csv`` (per method and loss: the seeds' final win rates with bootstrap 95% CIs,
their mean and std), ``paired.csv`` (per loss and pair of methods: the win-rate difference with a paired
bootstrap 95% CI over prompts and seeds, and the two methods head to head: the shares of prompts where A's final
response scores higher, lower or equal, and P(A wins) − P(B wins) with the same CI), ``results.md`` (these as
tables, and each run's drift) and ``win_rate.png`` (win rate against
step, mean over seeds with a min–max band, one panel per loss). The win rate counts ties as losses, as the paper.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import subprocess
import sys

log = logging.getLogger(__name__)

SEED_COLUMNS = ("win_rate", "ci_low", "ci_high", "tie_rate", "ci_groups_low", "ci_groups_high")  # results.csv
H2H_KEYS = ("a_wins", "b_wins", "ties", "diff", "ci_low", "ci_high", "p_value")  # paired.csv's h2h_* columns
# paired.csv's columns of the comparisons that resample whole groups of prompts (empty when the test set has none)
GROUPED_COLUMNS = ("n_groups", "group_ci_low", "group_ci_high", "group_p_value", "h2h_group_ci_low",
                   "h2h_group_ci_high", "h2h_group_p_value")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bpo_jax experiment", description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", help="YAML with base (keys and/or config: FILE), methods, loss_types, seeds, "
                                      "out_dir")
    p.add_argument("--out-dir", help="override the file's out_dir")
    p.add_argument("--dry-run", action="store_true", help="print each run's commands and whether it is finished")
    p.add_argument("--report-only", action="store_true", help="run nothing; write the results of finished runs")
    p.add_argument("--in-process", action="store_true",
                   help="run train/evaluate in this process (no isolation: a crash stops the grid; for tests)")
    args = p.parse_args(argv)

    from bpo_jax.config import ConfigError
    from bpo_jax.eval import experiment as ex
    from bpo_jax.runtime import logs

    logs.setup()

    try:
        exp = ex.load_experiment(args.experiment, args.out_dir)
        ex.check_finished_runs_match(exp)
    except ConfigError as err:
        log.error(f"experiment error: {err}")
        return 2
    if args.dry_run:
        for run in exp.runs:
            state = "finished" if ex.is_trained(run) and os.path.exists(ex.eval_file(run)) else "to run"
            log.info(f"# {run.method}/{run.loss_type}/seed{run.seed}: {state}\n"
                     f"python -m bpo_jax train {' '.join(run.train_args)}\n"
                     f"python -m bpo_jax evaluate --checkpoint {run.run_dir} --step {run.config.total_steps}")
        return 0
    failed = []
    if not args.report_only:
        log.info(f"experiment: {len(exp.runs)} runs ({len(exp.methods)} methods, {len(exp.loss_types)} losses, "
                 f"{len(exp.seeds)} seeds) in {exp.out_dir}")
        failed = ex.run_grid(exp, in_process if args.in_process else subprocess_command)
    results, pairs, unfinished = summarize(exp)
    os.makedirs(exp.out_dir, exist_ok=True)
    write_results(exp, results, pairs, unfinished)
    if results:
        plot_grid(exp, os.path.join(exp.out_dir, "win_rate.png"))
    log.info(f"results: {os.path.join(exp.out_dir, 'results.md')} ({len(exp.runs) - len(unfinished)} of "
             f"{len(exp.runs)} runs finished)")
    for run, step, rc in failed:
        log.error(f"FAILED: {run.run_dir}: {step} exited with {rc}; see {run.run_dir}/experiment.log")
    return 1 if failed else 0


def summarize(exp):
    """``bpo_jax.eval.experiment.summarize`` with the test set's groups of prompts when it gives them; without
    them, and a warning, when the test set cannot be read here or no longer holds the runs' prompts (the report
    then lacks only the columns marked groups)."""
    from bpo_jax.eval import experiment as ex
    from bpo_jax.wiring.tasks import prompt_groups

    try:
        return ex.summarize(exp, prompt_groups(exp.runs[0].config))
    except (OSError, ValueError) as err:
        log.warning(f"warning: the report has no CIs over groups of prompts: {err}")
        return ex.summarize(exp)


def subprocess_command(args: list, log_path: str) -> int:
    """``python -m bpo_jax <args>`` in a fresh process, its output appended to ``log_path``."""
    with open(log_path, "a") as out:
        return subprocess.run([sys.executable, "-m", "bpo_jax", *args], stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode


def in_process(args: list, log_path: str) -> int:
    """``python -m bpo_jax <args>`` in this process, which never joins a group of processes (a run that needs
    several processes is run by ``subprocess_command``, whose children join by themselves)."""
    from bpo_jax.__main__ import main as cli

    return cli(list(args), join=False)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _diff_ci(diff: float, low: float, high: float) -> str:
    """A difference of rates and its CI in points, as two table cells."""
    return f"{100 * diff:+.1f} | [{100 * low:+.1f}, {100 * high:+.1f}]"


def write_results(exp, results, pairs, unfinished) -> None:
    """``results.csv``, ``paired.csv`` and ``results.md`` in ``exp.out_dir``."""
    _write_results_csv(exp, results)
    with open(os.path.join(exp.out_dir, "paired.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["loss_type", "method_a", "method_b", "diff", "ci_low", "ci_high", "p_value", "n_prompts",
                    "n_seeds", "discordance", "h2h_a_wins", "h2h_b_wins", "h2h_ties", "h2h_diff", "h2h_ci_low",
                    "h2h_ci_high", "h2h_p_value", *GROUPED_COLUMNS])
        for p in pairs:
            d, h, dg, hg = p.vs_references, p.head_to_head, p.vs_references_grouped, p.head_to_head_grouped
            grouped = ([] if dg is None else [dg.n_groups, *(f"{x:.4f}" for x in (dg.ci_low, dg.ci_high, dg.p_value)),
                                               *(f"{hg[k]:.4f}" for k in ("ci_low", "ci_high", "p_value"))])
            w.writerow([p.loss_type, p.method_a, p.method_b, *(f"{x:.4f}" for x in d[:4]), d.n_prompts, d.n_seeds,
                        f"{d.discordance:.4f}", *(f"{h[k]:.4f}" for k in H2H_KEYS), *grouped])
    lines = [f"# Experiment: {exp.out_dir}", "", *_win_rate_lines(exp, results), "", *_group_lines(results),
             *_paired_lines(pairs),
             "", *_head_to_head_lines(pairs), "", *_drift_lines(exp)]
    if unfinished:
        lines += ["", f"Not finished ({len(unfinished)}): " + ", ".join(
            f"{r.method}/{r.loss_type}/seed{r.seed}" for r in unfinished)]
    with open(os.path.join(exp.out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _write_results_csv(exp, results) -> None:
    seed_cols = [f"{c}_seed{s}" for s in exp.seeds for c in SEED_COLUMNS]
    with open(os.path.join(exp.out_dir, "results.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "loss_type", "num_phases", "reference", "seeds_finished", "n_prompts",
                    "mean_win_rate", "std_win_rate", *seed_cols])
        for r in results:
            over = _method_config(exp, r.method)
            per = {s: wr for s, wr in zip(r.seeds, r.per_seed)}
            cells = [f"{getattr(per[s], c):.4f}" if s in per and getattr(per[s], c) is not None else ""
                     for s in exp.seeds for c in SEED_COLUMNS]
            w.writerow([r.method, r.loss_type, over.num_phases, over.reference, len(r.seeds), r.per_seed[0].n,
                        f"{r.summary.mean:.4f}", f"{r.summary.std:.4f}", *cells])


def _seed_cell(wr) -> str:
    """One seed's win rate, its prompt CI and (with groups) its group CI."""
    cell = f"{_pct(wr.win_rate)} [{_pct(wr.ci_low)}, {_pct(wr.ci_high)}]"
    return cell if wr.n_groups is None else f"{cell} / [{_pct(wr.ci_groups_low)}, {_pct(wr.ci_groups_high)}]"


def _win_rate_lines(exp, results) -> list:
    cfg = exp.runs[0].config
    groups = results[0].per_seed[0].n_groups if results else None
    lines = [f"Model {cfg.model}, data {cfg.data}; every method: T={cfg.total_steps} steps, batch {cfg.batch_size} "
             f"pairs, max_new_tokens={cfg.max_new_tokens}, {results[0].per_seed[0].n if results else '?'} test "
             f"prompts (eval_size={cfg.eval_size}), eval_max_new_tokens={cfg.eval_max_new_tokens}, beta={cfg.beta}, "
             f"lora_rank={cfg.lora_rank}, learning_rate={cfg.learning_rate}.", "",
             "Win rate (%) of the final policy's greedy response against the human reference; a tie counts as a "
             "loss, as in the paper. Per seed: the win rate with its bootstrap 95% CI over prompts" +
             (f" and, after the slash, the CI that resamples the test set's {groups} groups of prompts whole "
              "(read that one where a method wins or loses a group together)." if groups else "."), "",
             "| loss | method | F | reference | mean ± std over seeds | " +
             " | ".join(f"seed {s}" for s in exp.seeds) + " |",
             "|---|---|---|---|---|" + "---|" * len(exp.seeds)]
    for r in results:
        over, per = _method_config(exp, r.method), dict(zip(r.seeds, r.per_seed))
        cells = [_seed_cell(per[s]) if s in per else "—" for s in exp.seeds]
        lines.append(f"| {r.loss_type} | {r.method} | {over.num_phases} | {over.reference} | "
                     f"{_pct(r.summary.mean)} ± {_pct(r.summary.std)} | " + " | ".join(cells) + " |")
    return lines


def _group_lines(results) -> list:
    """The win rate per group of test prompts (minisum's templates), when the test set gives groups."""
    if not results or results[0].by_group is None:
        return []
    names = list(results[0].by_group)
    return ["Win rate (%) by group of test prompts (the `group` of the test rows; minisum's templates), over the "
            "finished seeds' prompts of each group: a method that wins or loses a whole group moves its win rate "
            f"by 1/{len(names)}.", "",
            "| loss | method | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names),
            *(f"| {r.loss_type} | {r.method} | " + " | ".join(_pct(r.by_group[g]) for g in names) + " |"
              for r in results), ""]


def _paired_lines(pairs) -> list:
    grouped = _grouped_note(pairs)
    lines = ["Paired differences (A − B, percentage points), same test prompts and seeds; 95% CI from a "
             "bootstrap that resamples prompts and seeds, the same draw for both methods; discordance: the share "
             "of prompt-runs whose outcomes differ." + grouped, "",
             "| loss | A | B | A − B | 95% CI | p |" + (" 95% CI, groups | p, groups |" if grouped else "") +
             " prompts × seeds | discordance |",
             "|---|---|---|---|---|---|---|---|" + ("---|---|" if grouped else "")]
    for p in pairs:
        d, g = p.vs_references, p.vs_references_grouped
        lines.append(f"| {p.loss_type} | {p.method_a} | {p.method_b} | {_diff_ci(d.diff, d.ci_low, d.ci_high)} | "
                     f"{d.p_value:.3f} | " + (_group_cells(g.ci_low, g.ci_high, g.p_value) if grouped else "") +
                     f"{d.n_prompts} × {d.n_seeds} | {_pct(d.discordance)}% |")
    return lines


def _head_to_head_lines(pairs) -> list:
    grouped = _grouped_note(pairs)
    lines = ["Head to head (the official evaluation's form): A's and B's final greedy responses to the same "
             "prompt, the higher score (the runs' evaluation scorer) wins, equal scores tie; seed k of A against "
             "seed k of B. A − B: P(A wins) − P(B wins) in points, with the same bootstrap" +
             (" (and the same with groups resampled)." if grouped else "."), "",
             "| loss | A | B | A wins % | B wins % | ties % | A − B | 95% CI | p |" +
             (" 95% CI, groups | p, groups |" if grouped else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if grouped else "")]
    for p in pairs:
        h, g = p.head_to_head, p.head_to_head_grouped
        lines.append(f"| {p.loss_type} | {p.method_a} | {p.method_b} | {_pct(h['a_wins'])} | {_pct(h['b_wins'])} | "
                     f"{_pct(h['ties'])} | {_diff_ci(h['diff'], h['ci_low'], h['ci_high'])} | {h['p_value']:.3f} |" +
                     (" " + _group_cells(g["ci_low"], g["ci_high"], g["p_value"]).rstrip() if grouped else ""))
    return lines


def _grouped_note(pairs) -> str:
    """The sentence on the group-resampled CIs, or "" when the test set gives no groups."""
    if not pairs or pairs[0].vs_references_grouped is None:
        return ""
    return (f" The columns marked groups resample the test set's {pairs[0].vs_references_grouped.n_groups} groups "
            "of prompts (the `group` of its rows; minisum's templates) whole, with the seeds, instead of single "
            "prompts: where a method wins or loses a group together, these are the CIs to read, and with few "
            "groups they still run narrow.")


def _group_cells(low: float, high: float, p: float) -> str:
    return f"[{100 * low:+.1f}, {100 * high:+.1f}] | {p:.3f} | "


def _drift_lines(exp) -> list:
    """Per trained run: win rate, log-ratio to the SFT model and gold score at each evaluated step, reward
    accuracy by half, the pairs dropped and resampled, and the final responses' distinct share and length."""
    from bpo_jax.eval.experiment import eval_file, final_responses, is_trained, run_drift

    lines = ["Drift per run: at each evaluated step, win rate (%) / log π_θ/π_SFT of the greedy responses (nats, "
             "mean over prompts) / mean gold score; the train step's reward accuracy over the first and second "
             "half of the steps (with the behavior reference over the steps that start no phase, where h = 0: n/a "
             "when every step starts one); pairs dropped (tied + identical) of the prompts sampled (under "
             "identical_pairs=resample more prompts are sampled in their place; under shrink the step trains on the "
             "pairs left); the final "
             "greedy responses: distinct texts (% of the test prompts) / mean words (the references' in the "
             "header) / cut off at eval_max_new_tokens (%; n/a in files written before it was recorded).", "",
             "| method | loss | seed | win rate / drift / score by step | reward acc. | dropped of sampled | "
             f"final: distinct / words / cut{_reference_words(exp)} |",
             "|---|---|---|---|---|---|---|"]
    for run in (r for r in exp.runs if is_trained(r)):
        d = run_drift(run)
        steps = "; ".join(f"{s}: {_pct(w)} / {lr:.2f} / {m:.3f}"
                          for s, w, lr, m in zip(d.eval_steps, d.win_rate, d.sft_logratio, d.mean_score))
        acc = " / ".join("n/a" if a != a else f"{a:.2f}" for a in d.reward_accuracy)  # nan: no step to count
        final = final_responses(run) if os.path.exists(eval_file(run)) else None
        cut = "n/a" if final is None or final.truncated != final.truncated else f"{_pct(final.truncated)}%"
        shape = f"{_pct(final.distinct)}% / {final.words:.1f} / {cut}" if final else "—"
        lines.append(f"| {run.method} | {run.loss_type} | {run.seed} | {steps} | {acc} | "
                     f"{d.tied_dropped} + {d.identical_dropped} of {d.prompts_sampled} | {shape} |")
    return lines


def _reference_words(exp) -> str:
    """`` (references: N)``: the human references' mean words, from the first run with a per-prompt file."""
    from bpo_jax.eval.experiment import eval_file, final_responses, is_trained

    run = next((r for r in exp.runs if is_trained(r) and os.path.exists(eval_file(r))), None)
    return f" (references: {final_responses(run).reference_words:.1f})" if run else ""


def _method_config(exp, method):
    return next(r.config for r in exp.runs if r.method == method)


def plot_grid(exp, out: str) -> None:
    """Win rate against step: one panel per loss, one line per method (mean over finished seeds at the steps
    they all evaluated), band = min..max over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from bpo_jax.eval.experiment import is_trained, win_rate_curve

    fig, axes = plt.subplots(1, len(exp.loss_types), figsize=(5 * len(exp.loss_types), 4), squeeze=False)
    for ax, loss in zip(axes[0], exp.loss_types):
        for method in exp.methods:
            curves = [dict(zip(*map(list, win_rate_curve(r)))) for r in exp.runs
                      if (r.method, r.loss_type) == (method, loss) and is_trained(r)]
            if not curves:
                continue
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            w = 100 * np.asarray([[c[s] for s in steps] for c in curves])
            line, = ax.plot(steps, w.mean(0), marker="o", label=f"{method} ({len(curves)} seeds)")
            ax.fill_between(steps, w.min(0), w.max(0), color=line.get_color(), alpha=0.2)
        ax.set(xlabel="step", ylabel="win rate vs references (%)", title=f"{loss}: mean over seeds, min–max band")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a loss with no finished run yet has no lines
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
