"""``python -m bpo_jax compare`` end to end on two tiny finished runs of the experiment runner: the same paired
comparison as the runner's, the API judge asked in both orders (also by two processes, which split the
requests), a run against itself, and bad input as one line."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from bpo_jax.__main__ import main as cli
from bpo_jax.cli.experiment import main as experiment_cli
from bpo_jax.eval import experiment as ex
from bpo_jax.eval.win_rate import win_rate_from_scores
from bpo_jax.wiring.tasks import prompt_groups
from multihost import judge_server, run_group
from testing import write_minisum_folder


@pytest.fixture(scope="module")
def grid(tiny_policy_and_rm, tmp_path_factory):
    """A finished 2-method x 1-seed grid of tiny runs on a tiny minisum folder, scored by the tiny reward model (a
    tiny random policy's responses all score ROUGE-L 0 against the gold summaries)."""
    root = tmp_path_factory.mktemp("compare_grid")
    (root / "data").mkdir()
    data = write_minisum_folder(root / "data", rows=6, groups=3)  # groups: the CIs that resample them
    spec = {"base": {"model": tiny_policy_and_rm[0], "reward_model": tiny_policy_and_rm[1], "data": str(data),
                     "total_steps": 2, "batch_size": 2, "max_new_tokens": 4, "eval_max_new_tokens": 6, "eval_size": 6,
                     "lora_rank": 2, "learning_rate": 5e-2, "export_policy": False},
            "methods": {"offline": {"num_phases": 1, "reference": "sft"},
                        "bpo_ft": {"num_phases": "T", "reference": "behavior"}},
            "loss_types": ["sigmoid"], "seeds": [0], "out_dir": str(root / "out")}
    path = root / "exp.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert experiment_cli([str(path), "--in-process"]) == 0
    # The random RM scores the human references above every response. With the runs' own responses as the
    # references instead (nothing but the evaluation reads them: the first run's on even rows, the second's on
    # odd ones), a run ties the references on its rows and wins or loses on the others as the other run does
    # against it: the runs' outcomes differ. The runner re-evaluates both (their scores files gone).
    exp = ex.load_experiment(str(path))
    responses = [[json.loads(line)["response"] for line in open(ex.eval_file(run))] for run in exp.runs]
    rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    (data / "test.jsonl").write_text("".join(json.dumps({**r, "reference": responses[i % 2][i]}) + "\n"
                                             for i, r in enumerate(rows)))
    for run in exp.runs:
        os.remove(ex.eval_file(run))
    assert experiment_cli([str(path), "--in-process"]) == 0
    return exp


def _summary_and_records(out, stem):
    summary = json.loads((out / f"{stem}.json").read_text())
    records = [json.loads(line) for line in (out / f"{stem}.jsonl").read_text().splitlines()]
    return summary, records


@pytest.mark.slow
def test_compare_matches_the_experiment_runner(grid, tmp_path, capsys):
    run_a, run_b = grid.runs
    assert cli(["compare", run_a.run_dir, run_b.run_dir, "--out", str(tmp_path)]) == 0
    summary, records = _summary_and_records(tmp_path, "compare_offline-sigmoid-seed0_step2_vs_bpo_ft-sigmoid-"
                                                      "seed0_step2_data")
    assert "A wins" in capsys.readouterr().out
    # The runner's paired comparison of the two runs (its per-prompt eval records, one seed) is compare's.
    [pair] = ex.summarize(grid, prompt_groups(run_a.config))[1]
    runner, ref = pair.vs_references, summary["vs_references"]
    assert (ref["diff"], ref["ci_low"], ref["ci_high"], ref["p_value"]) == (
        runner.diff, runner.ci_low, runner.ci_high, runner.p_value)
    for run, side in ((run_a, "a"), (run_b, "b")):  # the same responses and scores as the runs' final evaluation
        rows = [json.loads(line) for line in open(ex.eval_file(run))]
        assert [r[f"response_{side}"] for r in records] == [r["response"] for r in rows]
        assert [r[f"score_{side}"] for r in records] == pytest.approx([r["score"] for r in rows])
    scores = np.array([[r["score_a"], r["score_b"]] for r in records])
    assert 0 < ref["discordance"] < 1 and ref["ci_low"] < ref["ci_high"]  # the runs' outcomes differ, not all
    outcome = np.sign(scores[:, 0] - scores[:, 1])
    assert [r["winner"] for r in records] == [{1: "a", -1: "b", 0: "tie"}[o] for o in outcome]
    assert summary["a_wins"] - summary["b_wins"] == pytest.approx(summary["diff"])
    assert summary["ties"] == pytest.approx(np.mean(outcome == 0)) and summary["n"] == 6
    for run, side in ((run_a, "a"), (run_b, "b")):  # each side's responses cut off at eval_max_new_tokens
        rows = [json.loads(line) for line in open(ex.eval_file(run))]
        assert [r[f"truncated_{side}"] for r in records] == [r["truncated"] for r in rows]
        assert summary[f"{side}_truncation_rate"] == pytest.approx(np.mean([r["truncated"] for r in rows]))
    assert {k: summary[k] for k in pair.head_to_head} == pair.head_to_head  # the runner's head-to-head table's
    # With the test set's 3 groups of prompts resampled whole: the runner's columns marked groups.
    grouped, runner_g, h2h_g = summary["grouped"], pair.vs_references_grouped, pair.head_to_head_grouped
    assert [r["group"] for r in records] == ["g0", "g1", "g2"] * 2 and grouped["n_groups"] == runner_g.n_groups == 3
    keys = ("ci_low", "ci_high", "p_value")
    assert [grouped[k] for k in keys] == [h2h_g[k] for k in keys]
    assert [grouped["vs_references"][k] for k in keys] == [runner_g.ci_low, runner_g.ci_high, runner_g.p_value]
    for result, run in zip(ex.summarize(grid, prompt_groups(run_a.config))[0], grid.runs):  # win rate by group
        rows = [json.loads(line) for line in open(ex.eval_file(run))]
        wins = [float(r["score"] > r["reference_score"]) for r in rows]
        assert result.by_group == {f"g{k}": np.mean(wins[k::3]) for k in range(3)}
    report = Path(grid.out_dir, "results.md").read_text()  # and the runner's report has the columns
    assert "| 95% CI, groups | p, groups |" in report and "resample the test set's 3 groups" in report
    assert "| loss | method | g0 | g1 | g2 |" in report
    for result, run in zip(ex.summarize(grid, prompt_groups(run_a.config))[0], grid.runs):  # per seed: both CIs
        [wr] = result.per_seed
        rows = [json.loads(line) for line in open(ex.eval_file(run))]
        again = win_rate_from_scores([r["score"] for r in rows], [r["reference_score"] for r in rows],
                                     groups=["g0", "g1", "g2"] * 2)
        assert wr == again and wr.n_groups == 3
        assert f"[{100 * wr.ci_low:.1f}, {100 * wr.ci_high:.1f}] / [{100 * wr.ci_groups_low:.1f}, " in report
    assert (f"[{100 * runner_g.ci_low:+.1f}, {100 * runner_g.ci_high:+.1f}] | {runner_g.p_value:.3f} |" in report)


@pytest.mark.slow
def test_report_without_its_test_set_warns_and_drops_only_the_group_columns(grid, caplog):
    """``--report-only`` where the test set cannot be read (runs copied without their data): the report is
    written, without the columns marked groups, and a warning says why."""
    test_file, spec = Path(grid.runs[0].config.data, "test.jsonl"), str(Path(grid.out_dir).parent / "exp.yaml")
    report = Path(grid.out_dir, "results.md")
    with_groups = report.read_text()
    test_file.rename(test_file.with_suffix(".moved"))
    try:
        assert experiment_cli([spec, "--report-only"]) == 0
    finally:
        test_file.with_suffix(".moved").rename(test_file)
    without = report.read_text()
    assert "groups" not in without and "| 95% CI, groups |" in with_groups
    first_table = lambda text: [line for line in text.split("Win rate (%) by group")[0].split("Paired")[0]  # noqa: E731
                                .splitlines() if line.startswith("| sig")]
    assert first_table(without) == [re.sub(r" / \[[^]]*\]", "", line) for line in first_table(with_groups)]
    assert " / [" in first_table(with_groups)[0]  # the win rates as before, without their group CIs
    assert "no CIs over groups of prompts" in caplog.text and "test.jsonl" in caplog.text
    assert experiment_cli([spec, "--report-only"]) == 0 and report.read_text() == with_groups  # data back


@pytest.mark.slow
def test_compare_with_the_judge_and_with_itself(grid, tmp_path):
    run_a, run_b = grid.runs
    requests = []
    server = judge_server(gate=lambda: requests.append(1))
    judge = [f"judge_url=http://127.0.0.1:{server.server_port}/v1/chat/completions", "judge_model=m",
             "annotator=judge"]
    try:
        assert cli(["compare", run_a.run_dir, run_b.run_dir, "--out", str(tmp_path), *judge]) == 0
        stem = "compare_offline-sigmoid-seed0_step2_vs_bpo_ft-sigmoid-seed0_step2_data"
        summary, records = _summary_and_records(tmp_path, stem)
        differ = [r for r in records if r["response_a"] != r["response_b"]]
        assert len(requests) == 2 * len(differ) > 0  # both orders of every pair that differs
        for r in records:  # the loopback judge prefers the longer response, the first shown on equal length
            la, lb = len(r["response_a"]), len(r["response_b"])
            if r["response_a"] == r["response_b"]:
                assert (r["verdict_a_first"], r["verdict_b_first"], r["winner"]) == (None, None, "tie")
            else:
                assert r["winner"] == ("a" if la > lb else "b" if lb > la else "tie")
        assert "vs_references" not in summary and summary["annotator"] == "judge preference"

        # Two processes (2 devices each) split the judge's requests, each host its share of the prompts: the same
        # files, and again one request per order of every pair that differs.
        requests.clear()
        two = ["compare", run_a.run_dir, run_b.run_dir, "--out", str(tmp_path / "two"), *judge]
        res = run_group([two, two], devices=2)
        assert [r.returncode for r in res] == [0, 0], [r.output[-3000:] for r in res]
        assert _summary_and_records(tmp_path / "two", stem) == (summary, records)
        assert len(requests) == 2 * len(differ)

        # A run against itself: identical responses, all ties, no request.
        requests.clear()
        assert cli(["compare", run_a.run_dir, run_a.run_dir, "--out", str(tmp_path), *judge]) == 0
        summary, _ = _summary_and_records(tmp_path, "compare_seed0_step2_vs_seed0_step2_data")
        assert (summary["ties"], summary["diff"], summary["ci_low"], summary["ci_high"]) == (1.0, 0.0, 0.0, 0.0)
        assert requests == []
    finally:
        server.shutdown()
    # A run against one of its own checkpoints, by ROUGE-L; the files go to RUN_A's folder.
    assert cli(["compare", run_b.run_dir, run_b.run_dir + "/checkpoints/2", "annotator=rouge"]) == 0
    summary, records = _summary_and_records(Path(run_b.run_dir), "compare_seed0_step2_vs_seed0_step2_data")
    assert (summary["ties"], summary["diff"], summary["vs_references"]["diff"]) == (1.0, 0.0, 0.0)


def test_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "neither").mkdir()
    assert cli(["compare", str(tmp_path / "neither"), str(tmp_path / "neither")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "is neither a run directory" in err[0]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("total_steps: 2\nnum_phases: 2\n")
    assert cli(["compare", str(tmp_path / "run"), str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoint in" in err[0]
