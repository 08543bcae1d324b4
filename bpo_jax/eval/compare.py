"""Two policies head to head on the same test prompts (``python -m bpo_jax compare``):

  1. each policy's greedy responses to the run's test prompts (``win_rate.score_task``: the decoding, batches
     and split over hosts of ``train``'s and ``evaluate``'s evaluations), scored by the run's annotator together
     with the human references when the annotator scores one response at a time;
  2. each prompt's verdict: A wins, B wins, or a tie.
     - A scorer (ROUGE-L against the gold summaries, a reward model): the higher score wins; equal scores tie.
     - A pairwise judge (``annotator=judge``): the pair is asked in both orders, A shown first and then B shown
       first, and a side wins only when both orders prefer it; when the orders disagree (or either says tie)
       the prompt is a tie. This cancels the judge's position bias: a judge that always prefers the first
       response it is shown gives only ties. Identical responses are a tie without a request.
  3. the result: the shares of A wins, B wins and ties, and the head-to-head difference P(A wins) − P(B wins)
     with a paired bootstrap 95% CI over prompts (``stats.head_to_head``: ``stats.paired_bootstrap`` on the two
     sides' win indicators). With a scorer also each side's win rate against the human references (a tie loses,
     as in the paper) and their paired difference: the experiment runner's ``paired.csv`` comparison of two runs
     on one seed, computed the same way from the same per-prompt scores, as is the runner's head-to-head table.
     When the test set gives its prompts groups (minisum's templates), each CI also with whole groups resampled
     (``grouped``), as the runner's columns marked groups.
  4. ``write``: one record per prompt (the prompt, the reference, both responses, both scores or both orders'
     verdicts, the winner) and the summary as JSON.
"""

from __future__ import annotations

import dataclasses
import json
from typing import NamedTuple

import numpy as np

from bpo_jax.eval.annotators import FunctionAnnotator
from bpo_jax.eval.stats import head_to_head, head_to_head_outcomes, outcomes, paired_bootstrap
from bpo_jax.eval.win_rate import score_task
from bpo_jax.runtime import distributed
from bpo_jax.runtime import run_dir as rd

_UNSCORED = FunctionAnnotator(lambda prompt, response: 0.0)  # responses only: a judge compares them afterwards
_NAMES = {1.0: "a", 0.0: "b", 0.5: "tie"}  # a judge's preference for A -> the side it names


class Policy(NamedTuple):
    """One side: its ``label`` (file names, messages), its decoder ``model`` (``.config``), the ``params`` to
    decode with (a run's merged π_θ, or the model's own) and its EOS ids."""

    label: str
    model: object
    params: object
    eos_token_ids: tuple


class Comparison(NamedTuple):
    records: list  # one dict per test prompt
    summary: dict  # the counts, rates and CIs (``describe`` puts it in one line)


def compare_policies(cfg, run, a: Policy, b: Policy, **bootstrap_kw) -> Comparison:
    """Steps 1–3 on ``run``'s test set (``bpo_jax.wiring.tasks.Run``: its prompts, references, annotator, tokenizer
    and mesh) with ``cfg``'s evaluation settings; the same result on every host."""
    task = run.task
    judge = task.eval_annotator if hasattr(task.eval_annotator, "compare_many") else None
    side_a, side_b = (_responses(cfg, run, p, scored=judge is None) for p in (a, b))
    records = [{"prompt": p, "reference": r, "response_a": x, "response_b": y, "truncated_a": bool(ca),
                "truncated_b": bool(cb)}
               for p, r, x, y, ca, cb in zip(task.eval_prompts, task.references, side_a.responses, side_b.responses,
                                             side_a.truncated, side_b.truncated)]
    summary = {"a": a.label, "b": b.label, "data": task.name, "annotator": task.score_name, "n": len(records),
               # cut off at eval_max_new_tokens: a judge or a length-rewarding scorer may favour the longer side
               "a_truncation_rate": float(np.mean(side_a.truncated)),
               "b_truncation_rate": float(np.mean(side_b.truncated))}
    if judge is None:
        outcome = head_to_head_outcomes(side_a.scores, side_b.scores)
        for rec, sa, sb, ref in zip(records, side_a.scores, side_b.scores, side_a.reference_scores):
            rec.update(score_a=float(sa), score_b=float(sb), reference_score=float(ref))
        summary["vs_references"] = vs_references(side_a, side_b, **bootstrap_kw)
    else:
        first, second = judge_both_orders(judge, task.eval_prompts, side_a.responses, side_b.responses)
        outcome = both_orders_outcome(first, second)
        for rec, f, s in zip(records, first, second):
            rec.update(verdict_a_first=_NAMES.get(float(f)), verdict_b_first=_NAMES.get(float(s)))
    for rec, o in zip(records, outcome):
        rec["winner"] = "a" if o > 0 else "b" if o < 0 else "tie"
    summary.update(head_to_head(outcome, **bootstrap_kw))
    if task.eval_groups is not None:
        summary["grouped"] = grouped(outcome, task.eval_groups, None if judge else (side_a, side_b),
                                     **bootstrap_kw)
        for rec, g in zip(records, task.eval_groups):
            rec["group"] = g
    return Comparison(records, summary)


def grouped(outcome, groups, scored_sides=None, **bootstrap_kw) -> dict:
    """The head-to-head CI, and with a scorer's ``scored_sides`` (A's and B's scores) the CI against the
    references, with the test set's groups of prompts resampled whole (``stats.paired_bootstrap``'s ``groups``)."""
    h = head_to_head(outcome, groups=groups, **bootstrap_kw)
    out = {"n_groups": len(set(groups)), "ci_low": h["ci_low"], "ci_high": h["ci_high"], "p_value": h["p_value"]}
    if scored_sides is not None:
        side_a, side_b = scored_sides
        d = paired_bootstrap(outcomes(side_a.scores, side_a.reference_scores),
                             outcomes(side_b.scores, side_b.reference_scores), groups=groups, **bootstrap_kw)
        out["vs_references"] = {"ci_low": d.ci_low, "ci_high": d.ci_high, "p_value": d.p_value}
    return out


def _responses(cfg, run, policy: Policy, *, scored: bool):
    """``score_task`` for ``policy`` on ``run``'s test set; ``scored=False``: the responses only."""
    task = run.task if scored else dataclasses.replace(run.task, eval_annotator=_UNSCORED)
    side = dataclasses.replace(run, model=policy.model, eos_token_ids=policy.eos_token_ids, task=task)
    return score_task(cfg, side, policy.params)[0]


def judge_both_orders(judge, prompts, a, b) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt, the judge's preference for ``a`` over ``b`` with ``a`` shown first, and with ``b`` shown first
    (1: A, 0: B, 0.5: tie; nan where the two responses are identical, which is not asked). All requests go out
    as one batch (``Judge.compare_many``); with several processes each host asks for its share of the prompts
    and every host gets all the verdicts."""
    n, hosts, me = len(prompts), distributed.process_count(), distributed.process_index()
    per_host = -(-n // hosts)
    mine = [i for i in range(me * per_host, min(n, (me + 1) * per_host)) if a[i] != b[i]]

    def ask():
        prefs = judge.compare_many([(prompts[i], a[i], b[i]) for i in mine] +
                                   [(prompts[i], b[i], a[i]) for i in mine], as_given=True)
        return [mine, prefs[: len(mine)].tolist(), (1.0 - prefs[len(mine):]).tolist()]

    first, second = np.full(n, np.nan), np.full(n, np.nan)
    answers = distributed.agreed(ask)
    for rows, f, s in (distributed.gather_json(answers) if hosts > 1 else [answers]):
        first[rows], second[rows] = f, s
    return first, second


def both_orders_outcome(first, second) -> np.ndarray:
    """+1 where both orders prefer A, −1 where both prefer B, 0 otherwise (a disagreement, a tie, not asked)."""
    first, second = np.asarray(first, np.float64), np.asarray(second, np.float64)
    return np.where((first == 1) & (second == 1), 1.0, np.where((first == 0) & (second == 0), -1.0, 0.0))


def vs_references(side_a, side_b, **bootstrap_kw) -> dict:
    """Each side's win rate against the human references (strict: a tie loses) and their paired difference A −
    B with its bootstrap CI: ``experiment.summarize``'s comparison of two runs' per-prompt scores on one seed."""
    oa = outcomes(side_a.scores, side_a.reference_scores)
    ob = outcomes(side_b.scores, side_b.reference_scores)
    d = paired_bootstrap(oa, ob, **bootstrap_kw)
    return {"a_win_rate": float(oa.mean()), "b_win_rate": float(ob.mean()), "diff": d.diff, "ci_low": d.ci_low,
            "ci_high": d.ci_high, "p_value": d.p_value, "discordance": d.discordance}


def describe(summary: dict) -> str:
    """The summary as one line."""
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    pts = lambda x: f"{100 * x:+.1f}"  # noqa: E731
    line = (f"{summary['a']} vs {summary['b']} on {summary['data']} (n={summary['n']}, {summary['annotator']}): "
            f"A wins {pct(summary['a_wins'])}, B wins {pct(summary['b_wins'])}, ties {pct(summary['ties'])}; "
            f"A − B {pts(summary['diff'])} points (95% CI {pts(summary['ci_low'])} to {pts(summary['ci_high'])})")
    ref = summary.get("vs_references")
    if ref:
        line += (f"; vs the references A {pct(ref['a_win_rate'])}, B {pct(ref['b_win_rate'])}, A − B "
                 f"{pts(ref['diff'])} points (95% CI {pts(ref['ci_low'])} to {pts(ref['ci_high'])})")
    if g := summary.get("grouped"):
        line += (f"; with the {g['n_groups']} groups of prompts resampled whole, 95% CI {pts(g['ci_low'])} to "
                 f"{pts(g['ci_high'])}" + (f" (vs the references {pts(g['vs_references']['ci_low'])} to "
                                           f"{pts(g['vs_references']['ci_high'])})" if "vs_references" in g else ""))
    return line + (f"; cut off at the token limit: A {pct(summary['a_truncation_rate'])}, "
                   f"B {pct(summary['b_truncation_rate'])}")


def write(out_dir: str, stem: str, comparison: Comparison):
    """``<out_dir>/<stem>.jsonl`` (the records) and ``<out_dir>/<stem>.json`` (the summary), by the primary host;
    returns both paths."""
    records, summary = rd.path(out_dir, f"{stem}.jsonl"), rd.path(out_dir, f"{stem}.json")
    if distributed.is_primary():
        rd.path(out_dir).mkdir(parents=True, exist_ok=True)
        records.write_text("".join(json.dumps(r) + "\n" for r in comparison.records))
        summary.write_text(json.dumps(comparison.summary, indent=1) + "\n")
    return records, summary
