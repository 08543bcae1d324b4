"""The experiment runner: a 2-method x 1-loss x 2-seed grid of tiny runs end to end (results, skip on rerun,
resume of an interrupted run, the report's tables), the budget check and the shipped grids."""

import csv
import json
import os

import numpy as np
import pytest
import yaml

from bpo_jax.cli.experiment import main as experiment_cli
from bpo_jax.config import ConfigError
from bpo_jax.eval import experiment as ex
from testing import ROOT, write_minisum_folder
from torchless import pythonpath


def _spec(model, data, out_dir, **methods):
    return {"base": {"model": model, "data": str(data), "total_steps": 2, "batch_size": 2, "max_new_tokens": 4,
                     "eval_max_new_tokens": 4, "eval_size": 4, "lora_rank": 2, "eval_every": 1,
                     "learning_rate": 5e-3, "export_policy": False,
                     "tied_pairs": "second"},  # a tiny random model's responses all score ROUGE 0
            "methods": methods or {"offline": {"num_phases": 1, "reference": "sft"},
                                   "bpo_ft": {"num_phases": "T", "reference": "behavior"}},
            "loss_types": ["sigmoid"], "seeds": [0, 1], "out_dir": str(out_dir)}


def _write(tmp_path, spec):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_grid_writes_results_skips_finished_runs_and_resumes(tiny_policy_and_rm, tmp_path, capsys):
    (tmp_path / "data").mkdir()
    data = write_minisum_folder(tmp_path / "data", rows=6)
    out = tmp_path / "out"
    path = _write(tmp_path, _spec(tiny_policy_and_rm[0], data, out))
    assert experiment_cli([path, "--in-process"]) == 0
    assert capsys.readouterr().out.count("step 0: evaluating") == 2  # once per seed, not once per run
    exp = ex.load_experiment(path)
    assert [(r.method, r.loss_type, r.seed) for r in exp.runs] == [
        ("offline", "sigmoid", 0), ("bpo_ft", "sigmoid", 0), ("offline", "sigmoid", 1), ("bpo_ft", "sigmoid", 1)]
    assert exp.runs[1].config.num_phases == 2 and exp.runs[0].run_dir == str(out / "offline" / "sigmoid" / "seed0")

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["loss_type"], r["num_phases"], r["reference"]) for r in rows] == [
        ("offline", "sigmoid", "1", "sft"), ("bpo_ft", "sigmoid", "2", "behavior")]
    for row, method in zip(rows, ("offline", "bpo_ft")):
        finals = [_records(out / method / "sigmoid" / f"seed{s}")[-1] for s in (0, 1)]
        assert all(r["final"] and r["step"] == 2 for r in finals)
        for s, final in zip((0, 1), finals):  # the evaluate command's per-prompt scores give train's final win rate
            assert float(row[f"win_rate_seed{s}"]) == pytest.approx(final["eval/win_rate"], abs=1e-4)
            assert float(row[f"ci_low_seed{s}"]) <= float(row[f"win_rate_seed{s}"]) <= float(row[f"ci_high_seed{s}"])
        rates = [f["eval/win_rate"] for f in finals]
        assert float(row["mean_win_rate"]) == pytest.approx(np.mean(rates), abs=1e-4)
        assert float(row["std_win_rate"]) == pytest.approx(np.std(rates, ddof=1), abs=1e-4)
        assert row["n_prompts"] == "4" and row["seeds_finished"] == "2"
    with open(out / "paired.csv") as f:
        (pair,) = list(csv.DictReader(f))
    assert (pair["method_a"], pair["method_b"], pair["n_prompts"], pair["n_seeds"]) == ("offline", "bpo_ft", "4", "2")
    assert float(pair["diff"]) == pytest.approx(float(rows[0]["mean_win_rate"]) - float(rows[1]["mean_win_rate"]),
                                                abs=1e-3)
    md = (out / "results.md").read_text()
    assert "| sigmoid | offline | 1 | sft |" in md and "| sigmoid | offline | bpo_ft |" in md
    assert 0 <= float(pair["discordance"]) <= 1 and "| offline | sigmoid | 0 | 1: " in md  # the drift table
    final = ex.final_responses(exp.runs[0])  # its last column: the final responses' distinct share and length
    drift_row = next(line for line in md.splitlines() if line.startswith("| offline | sigmoid | 0 | "))
    assert drift_row.endswith(f" | {final.distinct * 100:.1f}% / {final.words:.1f} / {final.truncated * 100:.1f}% |")
    assert f"final: distinct / words / cut (references: {final.reference_words:.1f})" in md
    # Head to head: seed k's final responses of the two methods against each other, by score, pooled over seeds.
    scores = [[[json.loads(line)["score"] for line in open(ex.eval_file(r))] for r in exp.runs if r.seed == s]
              for s in (0, 1)]
    sign = np.sign(np.array([a for a, _ in scores]) - np.array([b for _, b in scores]))
    assert [float(pair[f"h2h_{k}"]) for k in ("a_wins", "b_wins", "ties", "diff")] == pytest.approx(
        [np.mean(sign > 0), np.mean(sign < 0), np.mean(sign == 0), np.mean(sign > 0) - np.mean(sign < 0)], abs=1e-4)
    assert float(pair["h2h_ci_low"]) <= float(pair["h2h_diff"]) <= float(pair["h2h_ci_high"])
    assert "Head to head" in md and "| sigmoid | offline | bpo_ft | " in md.split("Head to head")[1]
    # The SFT model is evaluated once per seed: the seed's second run reuses the first one's step-0 result.
    for seed in (0, 1):
        first, second = (_records(out / m / "sigmoid" / f"seed{seed}")[0] for m in ("offline", "bpo_ft"))
        assert first["step"] == second["step"] == 0 and "reused_from" not in first
        assert second["reused_from"] == str(out / "offline" / "sigmoid" / f"seed{seed}")
        assert {k: v for k, v in second.items() if k != "reused_from"} == first
    assert (out / "win_rate.png").read_bytes()[:4] == b"\x89PNG"

    # Rerun: every run is finished, nothing is trained or evaluated again.
    run_dirs = [r.run_dir for r in exp.runs]
    before = {d: (_records(d), os.path.getmtime(os.path.join(d, "metrics.jsonl"))) for d in run_dirs}
    capsys.readouterr()
    assert experiment_cli([path, "--in-process"]) == 0
    assert capsys.readouterr().out.count("finished, skipped") == 4
    assert {d: (_records(d), os.path.getmtime(os.path.join(d, "metrics.jsonl"))) for d in run_dirs} == before

    # An interrupted run (no final record yet, no per-prompt file): the same train command resumes it from its
    # checkpoint and adds only the final evaluation; its training steps are not repeated.
    victim = exp.runs[3]
    records = _records(victim.run_dir)
    with open(os.path.join(victim.run_dir, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records[:-1]))
    os.remove(ex.eval_file(victim))
    assert experiment_cli([path, "--in-process"]) == 0
    assert capsys.readouterr().out.count("finished, skipped") == 3
    resumed = _records(victim.run_dir)
    assert [r["step"] for r in resumed if "loss" in r] == [r["step"] for r in records if "loss" in r] == [1, 2]
    assert resumed[-1]["final"] and os.path.exists(ex.eval_file(victim))


def test_run_drift_reads_the_records_a_run_logs(tmp_path):
    """Closed form from hand-written records: the last record of a step wins (a resume logs a step twice),
    reward accuracy is averaged by half of T, with the behavior reference over the steps that start no phase (F = 2
    of T = 4: steps 1 and 3 start one; F = T: every step, so none is left), the phases' dropped pairs are summed."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ev = lambda w, lr, m: {"eval/win_rate": w, "eval/sft_logratio": lr, "eval/mean_score": m}  # noqa: E731
    recs = [{"step": 0, **ev(0.4, 0.0, 0.30)},
            {"step": 1, "rewards/accuracies": 0.5, "phase/prompts_sampled": 10, "phase/tied_pairs_dropped": 1,
             "phase/identical_pairs_dropped": 0},
            {"step": 2, "rewards/accuracies": 0.25}, {"step": 2, "rewards/accuracies": 1.0},
            {"step": 2, **ev(0.5, 2.0, 0.4)},
            {"step": 3, "rewards/accuracies": 0.5, "phase/prompts_sampled": 12, "phase/tied_pairs_dropped": 2,
             "phase/identical_pairs_dropped": 3},
            {"step": 4, "rewards/accuracies": 0.0, "final": True, **ev(0.75, 3.5, 0.6)}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = ex.TrainConfig(total_steps=4, num_phases=2, reference="behavior", run_dir=str(run_dir))
    assert ex.run_drift(ex.Run("m", "sigmoid", 0, cfg.replace(reference="sft"), ())).reward_accuracy == (0.75, 0.25)
    d = ex.run_drift(ex.Run("m", "sigmoid", 0, cfg, ()))
    assert d == ex.RunDrift((2, 4), (0.5, 0.75), (2.0, 3.5), (0.4, 0.6), (1.0, 0.0), 3, 3, 22)
    on_policy = ex.run_drift(ex.Run("m", "sigmoid", 0, cfg.replace(num_phases=4), ()))
    assert all(np.isnan(a) for a in on_policy.reward_accuracy)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({**r, "phase_start": 0}) + "\n" for r in recs))
    assert ex.run_drift(ex.Run("m", "sigmoid", 0, cfg, ())).reward_accuracy == (0.75, 0.25)  # the logged flag wins


def test_final_responses_count_distinct_texts_and_words(tmp_path):
    """Closed form from a hand-written per-prompt file: 2 distinct texts of 3 (collapse shows as a low share),
    mean words of the responses and of the references."""
    run = ex.Run("m", "sigmoid", 0, ex.TrainConfig(total_steps=4, run_dir=str(tmp_path / "run")), ())
    os.makedirs(run.run_dir)
    rows = [("a b c", "x y", True), ("a b c", "x y z w", False), ("d e", "x", False)]

    def write(with_cut):
        with open(ex.eval_file(run), "w") as f:
            f.writelines(json.dumps({"prompt": "p", "response": r, "reference": ref, "score": 0.5,
                                     "reference_score": 0.4, **({"truncated": c} if with_cut else {})}) + "\n"
                         for r, ref, c in rows)
        return ex.final_responses(run)

    got = write(True)
    assert got.distinct == pytest.approx(2 / 3) and got.words == pytest.approx(8 / 3)
    assert got.reference_words == pytest.approx(7 / 3) and got.truncated == pytest.approx(1 / 3)
    assert np.isnan(write(False).truncated)  # a file written before the flag was recorded


@pytest.mark.slow
def test_each_run_is_a_subprocess_and_a_failing_run_does_not_stop_the_grid(tiny_policy_and_rm, tmp_path, capsys,
                                                                            monkeypatch):
    monkeypatch.setenv("PYTHONPATH", pythonpath())  # the runs see what requirements.txt has
    (tmp_path / "data").mkdir()
    data = write_minisum_folder(tmp_path / "data", rows=6)
    spec = _spec(tiny_policy_and_rm[0], data, tmp_path / "out", broken={"reference": "fixed", "reference_path": str(
        tmp_path / "missing")}, offline={"num_phases": 1, "reference": "sft"})
    spec["seeds"] = [0]
    assert experiment_cli([_write(tmp_path, spec)]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "broken/sigmoid/seed0: train exited with 2" in err
    assert "does not exist" in (tmp_path / "out" / "broken" / "sigmoid" / "seed0" / "experiment.log").read_text()
    with open(tmp_path / "out" / "results.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == ["offline"]
    assert "Not finished (1): broken/sigmoid/seed0" in (tmp_path / "out" / "results.md").read_text()


def test_budget_check_refuses_a_method_that_changes_the_budget(tmp_path, capsys):
    spec = _spec("m", "minisum", tmp_path / "o", offline={"num_phases": 1, "reference": "sft"},
                 bpo_ft={"num_phases": "T", "total_steps": 4})
    with pytest.raises(ConfigError, match=r"method 'bpo_ft' sets total_steps=4; every method must run under the "
                                          r"same budget .* A method may set only: num_phases, reference"):
        ex.build_experiment(spec)
    assert experiment_cli([_write(tmp_path, spec)]) == 2
    assert "every method must run under the same budget" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"base sets \['seed'\]"):
        ex.build_experiment({**spec, "base": {**spec["base"], "seed": 3}})
    with pytest.raises(ConfigError, match="method 'f3' with loss_type=sigmoid: total_steps=2 must be a multiple"):
        ex.build_experiment({**spec, "methods": {"f3": {"num_phases": 3}}})
    good = {**spec, "methods": {"offline": {"num_phases": 1, "reference": "sft"}, "bpo_ft": {"num_phases": "T"}}}
    with pytest.raises(ConfigError, match="only names loss 'ipo', which is not in loss_types"):
        ex.build_experiment({**good, "only": {"ipo": ["offline"]}})
    with pytest.raises(ConfigError, match="only.sigmoid must be a non-empty list of methods from"):
        ex.build_experiment({**good, "only": {"sigmoid": ["nope"]}})
    assert [(r.method, r.seed) for r in ex.build_experiment({**good, "only": {"sigmoid": ["bpo_ft"]}}).runs] == [
        ("bpo_ft", 0), ("bpo_ft", 1)]
    staged = {**good, "stages": [["bpo_ft"], ["offline"]]}  # a stage runs over every seed before the next
    assert [(r.method, r.seed) for r in ex.build_experiment(staged).runs] == [
        ("bpo_ft", 0), ("bpo_ft", 1), ("offline", 0), ("offline", 1)]
    with pytest.raises(ConfigError, match="stages must be lists of methods that name each of"):
        ex.build_experiment({**good, "stages": [["bpo_ft"]]})
    with pytest.raises(ConfigError, match="missing keys \\['seeds'\\]"):
        ex.build_experiment({k: v for k, v in spec.items() if k != "seeds"})


def test_base_may_name_a_config_file_with_overrides(tmp_path, monkeypatch, capsys):
    """``base: <file>`` and ``base: {config: <file>, key: value}``: the file's keys reach every run, the mapping's
    keys and the methods' override it, the grid's keys override the file's loss_type and run_dir; the train command
    gets ``--config <file>``. A relative path is read from the current directory only."""
    methods = {"offline": {"num_phases": 1, "reference": "sft"}, "bpo_ft": {"num_phases": "T", "ensemble_size": 1}}
    spec = {"base": "configs/tldr_gemma2b.yaml", "methods": methods, "loss_types": ["ipo"], "seeds": [3],
            "out_dir": str(tmp_path / "o")}
    monkeypatch.chdir(ROOT)
    exp = ex.build_experiment(spec)
    paper, default = ex.load_config(os.path.join(ROOT, "configs", "tldr_gemma2b.yaml")), ex.TrainConfig()
    keys = ("total_steps", "lora_rank", "max_prompt_length", "data_dir", "ensemble_size")
    assert all(getattr(paper, k) != getattr(default, k) for k in keys)  # so the file's values are seen below
    for run in exp.runs:  # the paper config's setting, the grid's keys
        assert all(getattr(run.config, k) == getattr(paper, k) for k in keys if k != "ensemble_size")
        assert (run.config.loss_type, run.config.seed, run.config.run_dir) == (
            "ipo", 3, str(tmp_path / "o" / run.method / "ipo" / "seed3"))
        assert run.train_args[:2] == ("--config", "configs/tldr_gemma2b.yaml")
    offline, bpo_ft = exp.runs
    assert (offline.config.num_phases, offline.config.reference, offline.config.ensemble_size) == (
        1, "sft", paper.ensemble_size)
    assert (bpo_ft.config.num_phases, bpo_ft.config.ensemble_size) == (paper.total_steps, 1)  # T: the file's

    over = ex.build_experiment({**spec, "base": {"config": "configs/tldr_gemma2b.yaml", "total_steps": 8,
                                                 "eval_size": 16}})
    assert [(r.config.total_steps, r.config.num_phases, r.config.eval_size, r.config.lora_rank) for r in over.runs] == [
        (8, 1, 16, paper.lora_rank), (8, 8, 16, paper.lora_rank)]
    assert over.runs[1].train_args[2:] == ("total_steps=8", "eval_size=16", "num_phases=8", "ensemble_size=1",
                                           "loss_type=ipo", "seed=3", f"run_dir={over.runs[1].run_dir}")
    path = _write(tmp_path, {**spec, "base": {"config": "configs/tldr_gemma2b.yaml", "total_steps": 8}})
    capsys.readouterr()
    assert experiment_cli([path, "--dry-run"]) == 0
    assert "python -m bpo_jax train --config configs/tldr_gemma2b.yaml total_steps=8 " in capsys.readouterr().out

    # Errors name the file or the key; a file next to the experiment is not looked for there.
    (tmp_path / "paper.yaml").write_text("total_steps: 4\n")
    with pytest.raises(ConfigError, match=r"base config file 'paper.yaml' does not exist \(a relative path is read "
                                          r"from the current directory"):
        ex.load_experiment(_write(tmp_path, {**spec, "base": "paper.yaml"}))
    monkeypatch.chdir(tmp_path)
    assert {r.config.total_steps for r in ex.load_experiment(_write(tmp_path, {**spec, "base": "paper.yaml"})).runs
            } == {4}
    with pytest.raises(ConfigError, match=r"base: unknown config key 'total_stepz'.*did you mean total_steps"):
        ex.build_experiment({**spec, "base": {"config": "paper.yaml", "total_stepz": 8}})
    (tmp_path / "typo.yaml").write_text("batch_sise: 4\n")
    with pytest.raises(ConfigError, match=r"base: unknown config key 'batch_sise' in typo.yaml"):
        ex.build_experiment({**spec, "base": "typo.yaml"})
    with pytest.raises(ConfigError, match=r"base sets \['run_dir'\]"):
        ex.build_experiment({**spec, "base": {"config": "paper.yaml", "run_dir": "x"}})
    with pytest.raises(ConfigError, match=r"base must be a config file's path or a mapping"):
        ex.build_experiment({**spec, "base": ["paper.yaml"]})


def test_shipped_experiments_validate_and_dry_run(capsys):
    for name in ("tiny", "minisum_claim"):
        assert experiment_cli([os.path.join(ROOT, "configs", "experiments", f"{name}.yaml"), "--dry-run",
                               "--out-dir", "/nonexistent/x"]) == 0
    out = capsys.readouterr().out
    assert out.count("python -m bpo_jax train") == 4 + 5 * 3 + 2 * 2 * 3
    claim = ex.load_experiment(os.path.join(ROOT, "configs", "experiments", "minisum_claim.yaml"))
    assert {r.config.num_phases for r in claim.runs} == {1, 2, claim.runs[0].config.total_steps}
    # loss by loss, seed by seed: the first 5 runs are every DPO method on seed 0
    assert [(r.loss_type, r.seed) for r in claim.runs[:5]] == [("sigmoid", 0)] * 5
    assert {(r.method, r.loss_type) for r in claim.runs if r.loss_type != "sigmoid"} == {
        (m, loss) for m in ("offline", "bpo_f2") for loss in ("ipo", "hinge")}
    assert claim.runs[0].config.data == "data/minisum_large"
    long = ex.load_experiment(os.path.join(ROOT, "configs", "experiments", "minisum_claim_t64.yaml"))
    cfg = long.runs[0].config  # issue 27's setting: T = 64 steps of 8 pairs, all 400 test prompts, T/2 and T
    assert (cfg.total_steps, cfg.batch_size, cfg.eval_size, cfg.eval_every, cfg.lora_rank) == (64, 8, 0, 32, 16)
    assert [r.method for r in long.runs[:4]] == ["offline", "bpo_f2", "on_policy_sft", "bpo_ft"]
    assert [r.seed for r in long.runs[:12]] == [0] * 4 + [1] * 4 + [2] * 4  # the main question first
    assert {r.config.ensemble_size for r in long.runs} == {1, 3} and len(long.runs) == 24


def test_a_metrics_line_cut_short_does_not_stop_the_runner(tmp_path):
    """A run killed mid-line leaves its metrics.jsonl ending in a cut line: the runner still sees what the file
    holds (finished or not, its step-0 evaluation), the plot still reads it, and a reused step-0 record is appended
    after the cut text has been moved aside rather than glued to it."""
    from bpo_jax.eval.plot import load_series

    (tmp_path / "data").mkdir()
    exp = ex.load_experiment(_write(tmp_path, _spec("smollm2-135m-instruct", write_minisum_folder(tmp_path / "data"),
                                                    tmp_path / "out")))
    donor, run = exp.runs[0], exp.runs[1]
    step0 = {"step": 0, "eval/win_rate": 0.5, "eval/ci_low": 0.4, "eval/ci_high": 0.6}
    for r in (donor, run):
        os.makedirs(r.run_dir)
    with open(os.path.join(donor.run_dir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps(step0) + "\n" + json.dumps({"step": 2, "loss": 0.6, "final": True}) + '\n{"step": 3, "lo')
    with open(os.path.join(run.run_dir, "metrics.jsonl"), "w") as f:
        f.write('{"step": 0, "eval/win')
    assert ex.is_trained(donor) and not ex.is_trained(run)
    assert list(load_series(donor.run_dir)["loss_step"]) == [2]
    assert ex.reuse_step0_eval(exp, run) == donor.run_dir
    assert _records(run.run_dir) == [{**step0, "reused_from": donor.run_dir}]
    assert open(os.path.join(run.run_dir, "metrics.jsonl.cut")).read() == '{"step": 0, "eval/win\n'
