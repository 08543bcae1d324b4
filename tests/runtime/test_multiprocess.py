"""Several JAX processes on one machine (``jax.distributed`` over 127.0.0.1, gloo CPU collectives), as the hosts
of a pod slice run: two processes with 2 CPU devices each train, are stopped by a SIGTERM that only one of them
receives (both save and exit), restart and resume; the per-step losses and the win rates equal a single process
with the same 4 devices and the same global batches. Bad multi-host settings fail before any compute.

The harness (``tests/multihost.py``) builds each child's environment explicitly and kills the group when one
fails or it overruns its deadline: nothing here can hang CI.
"""


import pytest

from multihost import assert_same_losses, losses, run_group
from testing import write_minisum_folder

pytestmark = pytest.mark.slow  # several processes or a fresh venv (pyproject.toml's markers)


@pytest.fixture(scope="module")
def setting(tiny_policy_and_rm, tmp_path_factory):
    data = write_minisum_folder(tmp_path_factory.mktemp("mp_data"), rows=10)
    policy, rm = tiny_policy_and_rm
    common = [f"model={policy}", f"data={data}", "annotator=reward_model", f"reward_model={rm}", "total_steps=4",
              "num_phases=2", "batch_size=4", "reward_batch_size=4", "max_new_tokens=4", "eval_max_new_tokens=4",
              "eval_size=5", "lora_rank=2", "learning_rate=5e-3", "checkpoint_every=1", "seed=3"]
    return common, tmp_path_factory.mktemp("mp_runs")


def _final_line(stdout: str) -> str:
    line = next(x for x in stdout.splitlines() if x.startswith("win rate vs human references:"))
    return line.split(" (")[0]  # without the elapsed time


def test_two_processes_train_resume_and_match_one_process(setting):
    common, runs = setting
    single_dir, multi_dir = runs / "single", runs / "multi"
    [(rc, single_out, _)] = run_group([["train", *common, f"run_dir={single_dir}"]], devices=4)
    assert rc == 0, single_out[-3000:]

    train = ["train", *common, f"run_dir={multi_dir}"]
    metrics = multi_dir / "metrics.jsonl"
    first = run_group([train, train], devices=2,
                       signal_when=lambda: metrics.exists() and '"step": 2,' in metrics.read_text())
    # Only process 1 got the SIGTERM; both agreed to save and stop (exit 143), mid-run.
    assert [r[0] for r in first] == [143, 143], [r[1][-2000:] for r in first]
    stopped_at = max(losses(multi_dir))
    assert 2 <= stopped_at < 4
    second = run_group([train, train], devices=2)
    assert [r[0] for r in second] == [0, 0], [r[1][-2000:] for r in second]
    assert f"resumed {multi_dir} at step {stopped_at}" in second[0][1]
    assert "win rate" not in second[1][1]  # only the primary prints

    assert_same_losses(losses(multi_dir), losses(single_dir), [1, 2, 3, 4])
    assert _final_line(second[0][1]) == _final_line(single_out)
    assert (multi_dir / "policy" / "model.safetensors").is_file() and (multi_dir / "plot.png").is_file()

    # `evaluate` on two processes splits the test set across them and prints what one process prints; one
    # process reads the two-process run (a resume could not), as a pod's run is evaluated on one machine.
    evals = run_group([["evaluate", "--checkpoint", str(multi_dir)]] * 2, devices=2)
    [(rc, one_eval, _)] = run_group([["evaluate", "--checkpoint", str(multi_dir)]], devices=4)
    assert [r[0] for r in evals] == [0, 0] and rc == 0, [evals[0][1][-2000:], one_eval[-2000:]]
    line = lambda out: next(x for x in out.splitlines() if "win rate vs human references" in x).split(": ", 1)[1]  # noqa: E731
    assert line(evals[0][1]).split(". Responses")[0] == line(one_eval).split(". Responses")[0]

    # Resuming the two-process run with one process is refused, naming both counts.
    [(rc, out, _)] = run_group([train], devices=4)
    assert rc == 2 and "written by 2 processes; this run has 1" in out, out[-2000:]


def test_bad_multi_host_settings_fail_before_compute(setting, tmp_path):
    common, _ = setting
    # 4 batch shards (2 hosts x 2 devices): a batch of 2 pairs cannot split.
    bad = ["train", *common, "batch_size=2", f"run_dir={tmp_path / 'b'}"]
    for rc, out, _ in run_group([bad, bad], devices=2):
        assert rc == 2 and "batch_size=2 does not split over 2 processes x 2 batch shards" in out, out[-2000:]
    # A relative run_dir seen from two different working directories: not shared storage.
    cwds = [tmp_path / "host0", tmp_path / "host1"]
    for c in cwds:
        c.mkdir()
    local = ["train", *common, "run_dir=runs/x"]
    for rc, out, _ in run_group([local, local], devices=2, cwd=cwds):
        assert rc == 2 and "is not shared storage: processes [1]" in out, out[-2000:]

