"""docs/results.md's T = 64 figures are the archived runs' own: every finished run's per-prompt scores in
docs/results_t64_runs (and docs/results_mechanics_runs) give the win rate and CI the doc's table prints for that
method and seed in its section (with the CI that resamples minisum's templates, where the doc prints one), and
the step-64 record of its metrics.jsonl says the same."""

import glob
import json
import os

import pytest

from bpo_jax.data import minisum
from bpo_jax.eval.win_rate import win_rate_from_scores
from testing import ROOT

# archive folder -> (the doc section that reports it, the heading that ends that section)
ARCHIVES = {"results_t64_runs": ("## T = 64 on all 400 test prompts", "## T = 8"),
            "results_mechanics_runs": ("## T = 64 with the paper's own mechanics", "## T = 64 on all 400 test prompts")}
NAMES = {"offline": "offline DAP", "bpo_f2": "BPO", "on_policy_sft": "on-policy DAP (OAIF)", "bpo_ft": "BPO, on-policy",
         "bpo_f4": "BPO (stage 2)", "bpo_f8": "BPO (stage 2)", "f2_sft": "ablation: F = 2, SFT ref.",
         "bpo_f2_ens3": "ablation: BPO, 3-member ensemble"}
# the test prompts' templates (prompt text -> group), read once: every run is scored on these 400 prompts
TEMPLATES = {minisum.prompt_text(r): r["group"]
             for r in minisum.load_rows(os.path.join(ROOT, "data", "minisum_large", "test.jsonl"))}
MAIN = {(m, f"seed{s}") for m in ("offline", "bpo_f2", "on_policy_sft", "bpo_ft") for s in range(3)}


def _finished(archive):
    return sorted(glob.glob(os.path.join(ROOT, "docs", archive, "*", "sigmoid", "seed*", "eval_step64_*.jsonl")))


@pytest.mark.parametrize("archive", ARCHIVES)
def test_the_archive_has_the_four_main_methods_on_three_seeds(archive):
    runs = os.path.join(ROOT, "docs", archive)
    assert MAIN <= {tuple(os.path.relpath(f, runs).split(os.sep)[0:3:2]) for f in _finished(archive)}


@pytest.mark.parametrize("path", [p for a in ARCHIVES for p in _finished(a)],
                         ids=lambda p: os.path.relpath(os.path.dirname(p), os.path.join(ROOT, "docs")))
def test_each_archived_run_is_in_the_doc_as_measured(path):
    archive, method, _, seed_dir = os.path.relpath(os.path.dirname(path), os.path.join(ROOT, "docs")).split(os.sep)
    rows = [json.loads(line) for line in open(path)]
    wr = win_rate_from_scores([r["score"] for r in rows], [r["reference_score"] for r in rows],
                              groups=[TEMPLATES[r["prompt"]] for r in rows])
    assert wr.n == 400 and wr.n_groups == 8
    with open(os.path.join(os.path.dirname(path), "metrics.jsonl")) as f:
        final = [r for r in map(json.loads, f) if r.get("step") == 64 and "eval/win_rate" in r][-1]
    assert final["eval/win_rate"] == pytest.approx(wr.win_rate, abs=1e-9)
    cell = f"{100 * wr.win_rate:.1f} [{100 * wr.ci_low:.1f}, {100 * wr.ci_high:.1f}]"
    doc = open(os.path.join(ROOT, "docs", "results.md")).read()
    start, end = ARCHIVES[archive]
    section = doc[doc.index(start):doc.index(end)]
    row = next(line for line in section.splitlines() if line.startswith(f"| {NAMES[method]} |")
               and (method not in ("bpo_f4", "bpo_f8") or f"| {method[-1]} |" in line))
    printed = row.split(" | ")[4 + int(seed_dir.removeprefix("seed"))].strip(" |")
    if " / " in printed:  # the CI with the templates resampled whole, after the slash
        cell += f" / [{100 * wr.ci_groups_low:.1f}, {100 * wr.ci_groups_high:.1f}]"
    assert printed == cell, (row, cell)
