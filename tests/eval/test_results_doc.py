"""docs/results.md's T = 64 figures are the archived runs' own: every finished run's per-prompt scores in
docs/results_t64_runs give the win rate and CI the doc's table prints for that method and seed, and the step-64
record of its metrics.jsonl says the same."""

import glob
import json
import os

import pytest

from bpo_jax.eval.win_rate import win_rate_from_scores
from testing import ROOT

RUNS = os.path.join(ROOT, "docs", "results_t64_runs")
NAMES = {"offline": "offline DAP", "bpo_f2": "BPO", "on_policy_sft": "on-policy DAP (OAIF)", "bpo_ft": "BPO, on-policy",
         "bpo_f4": "BPO (stage 2)", "bpo_f8": "BPO (stage 2)", "f2_sft": "ablation: F = 2, SFT ref.",
         "bpo_f2_ens3": "ablation: BPO, 3-member ensemble"}


def _finished():
    return sorted(glob.glob(os.path.join(RUNS, "*", "sigmoid", "seed*", "eval_step64_*.jsonl")))


def test_the_archive_has_the_four_main_methods_on_three_seeds():
    done = {tuple(os.path.relpath(f, RUNS).split(os.sep)[0:3:2]) for f in _finished()}
    assert {(m, f"seed{s}") for m in ("offline", "bpo_f2", "on_policy_sft", "bpo_ft") for s in range(3)} <= done


@pytest.mark.parametrize("path", _finished(), ids=lambda p: os.path.relpath(os.path.dirname(p), RUNS))
def test_each_archived_run_is_in_the_doc_as_measured(path):
    method, _, seed_dir = os.path.relpath(os.path.dirname(path), RUNS).split(os.sep)
    rows = [json.loads(line) for line in open(path)]
    wr = win_rate_from_scores([r["score"] for r in rows], [r["reference_score"] for r in rows])
    assert wr.n == 400
    with open(os.path.join(os.path.dirname(path), "metrics.jsonl")) as f:
        final = [r for r in map(json.loads, f) if r.get("step") == 64 and "eval/win_rate" in r][-1]
    assert final["eval/win_rate"] == pytest.approx(wr.win_rate, abs=1e-9)
    cell = f"{100 * wr.win_rate:.1f} [{100 * wr.ci_low:.1f}, {100 * wr.ci_high:.1f}]"
    doc = open(os.path.join(ROOT, "docs", "results.md")).read()
    section = doc[doc.index("## T = 64"):doc.index("## T = 8")]
    row = next(line for line in section.splitlines() if line.startswith(f"| {NAMES[method]} |")
               and (method not in ("bpo_f4", "bpo_f8") or f"| {method[-1]} |" in line))
    seed = int(seed_dir.removeprefix("seed"))
    assert row.split(" | ")[4 + seed].strip(" |") == cell, (row, cell)
