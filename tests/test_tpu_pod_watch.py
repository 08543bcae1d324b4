"""launch/tpu_pod.sh's watch against the fake gcloud (tests/fake_gcloud.py) and fake workers whose training
follows a plan: it stops every worker when one fails, restarts after a preemption (re-creating the slice only with
--recreate), notices a dead host after --missed-polls polls, restarts by the exit code contract and never on a
config error."""

import json
import os
import re
import subprocess
import time

import pytest

from fake_gcloud import TPU, TRAIN, executable, fake_gcloud_env, gcloud_calls, run_launcher


@pytest.fixture
def fake(tmp_path):
    """PATH with the fake gcloud (and a marker: sbatch/srun/scontrol fail loudly if called); (tmp_path, env)."""
    return fake_gcloud_env(tmp_path)


# Fake workers for `watch`: pgrep/pkill see and signal the fake training of their own home (HOME/running holds
# its pid), and the training follows HOME/plan, one line per run: a number (exit with it), "sleep" (run until
# SIGTERM, then exit 143 as the program does after saving), "preempt" (the slice turns PREEMPTED, exit 143),
# "die" (this worker's host goes down), "glitch" (this worker's host does not answer two status polls, then
# exit 0). Each run appends "PYTHONUNBUFFERED=... ARGS" to HOME/runs.
FAKE_TRAIN = r"""#!/bin/bash
[ "$1 $2 $3" = "-m bpo_jax train" ] || exit 0  # pip, from setup
echo "PYTHONUNBUFFERED=${PYTHONUNBUFFERED:-} $*" >> "$HOME/runs"
step=$(sed -n "$(wc -l < "$HOME/runs")p" "$HOME/plan")
child=""
trap 'kill "$child" 2>/dev/null; rm -f "$HOME/running"; echo SIGTERM >> "$HOME/events"; exit 143' TERM
case $step in sleep | die) sleep 30 & child=$! ;; esac
echo $$ > "$HOME/running"  # pkill finds it from here on: the trap and the child are in place
case $step in
  sleep) wait "$child" ;;
  preempt) echo PREEMPTED > "$FAKE_ROOT/state" ;;
  die) touch "$FAKE_ROOT/dead-$(basename "$HOME")"; wait "$child" ;;
  glitch)
    touch "$FAKE_ROOT/unreachable" "$FAKE_ROOT/dead-$(basename "$HOME")"
    until [ "$(grep -c 'exited with code' "$FAKE_ROOT/unreachable")" -ge 2 ]; do sleep 0.05; done
    rm "$FAKE_ROOT/dead-$(basename "$HOME")" ;;
esac
rm -f "$HOME/running"
case $step in sleep | die | glitch) exit 0 ;; preempt) exit 143 ;; *) exit "$step" ;; esac
"""


@pytest.fixture
def slice2(fake):
    """Two fake workers with a .venv whose python is FAKE_TRAIN; returns (tmp_path, env, homes, set_plans)."""
    tmp_path, env = fake
    bin_w = tmp_path / "worker_bin"
    bin_w.mkdir()
    executable(bin_w / "sudo", "#!/bin/sh\nexit 0\n")
    executable(bin_w / "lsof", "#!/bin/sh\nexit 1\n")
    executable(bin_w / "pgrep", '#!/bin/sh\n[ -f "$HOME/running" ]\n')
    executable(bin_w / "pkill", '#!/bin/sh\n[ -f "$HOME/running" ] && kill "$1" "$(cat "$HOME/running")"\n')
    env.update(FAKE_ROOT=str(tmp_path), FAKE_WORKERS="2", FAKE_WORKER_PATH=f"{bin_w}:{os.environ['PATH']}",
               TPU_POLL_SECONDS="0.2")
    homes = [tmp_path / "w0", tmp_path / "w1"]
    for home in homes:
        venv = home / "bpo_jax/.venv/bin"
        venv.mkdir(parents=True)
        (venv / "activate").write_text('PATH="$PWD/.venv/bin:$PATH"\n')
        executable(venv / "python", FAKE_TRAIN)

    def set_plans(*plans):
        for home, plan in zip(homes, plans):
            (home / "plan").write_text("\n".join(plan) + "\n")
    yield tmp_path, env, homes, set_plans
    for home in homes:  # no fake training left behind
        if (home / "running").exists():
            subprocess.run(["kill", (home / "running").read_text().strip()], check=False)


def _runs(home):
    return (home / "runs").read_text().splitlines() if (home / "runs").exists() else []


def _wait_for(cond, what, timeout=15):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, what
        time.sleep(0.05)


def _qr_calls(tmp_path, verb):
    return [c for c in gcloud_calls(tmp_path) if c[2:4] == ["queued-resources", verb]]


def _missed_polls(tmp_path):
    """The status polls (ssh) that found a worker's host down."""
    path = tmp_path / "unreachable"
    lines = path.read_text().splitlines() if path.exists() else []
    return [c for c in map(json.loads, lines) if "exited with code" in c[-1]]


@pytest.mark.slow
def test_tpu_watch_fails_fast(slice2):
    """One worker fails while the other trains: watch stops every worker and exits non-zero; all exit 0: 0."""
    tmp_path, env, homes, set_plans = slice2
    set_plans(["sleep"], ["3"])
    run_launcher(TPU, ["run", "--workers", "2", "--", *TRAIN], env)
    _wait_for(lambda: (homes[0] / "running").exists() and (homes[1] / "bpo_logs/bpo-pod.rc").exists(), "started")
    out = run_launcher(TPU, ["watch", "--workers", "2"], env, check=False)
    assert out.returncode == 1 and "exited with code 3: not restarted" in out.stderr, out.stdout + out.stderr
    assert "stopping the training on every worker" in out.stdout
    assert (homes[0] / "events").read_text() == "SIGTERM\n"  # the healthy worker was stopped (and saved)
    assert (homes[0] / "bpo_logs/bpo-pod.rc").read_text().strip() == "143"
    for home in homes:
        assert _runs(home) == ["PYTHONUNBUFFERED=1 -m bpo_jax train " + " ".join(TRAIN)]
    assert not _qr_calls(tmp_path, "create") and not _qr_calls(tmp_path, "delete")

    set_plans(["sleep", "0"], ["3", "0"])  # run --watch: a finished run on every worker exits 0
    out = run_launcher(TPU, ["run", "--watch", "--workers", "2", "--", *TRAIN], env)
    assert "finished on every worker" in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("restart, recreate", [(0, False), (1, False), (1, True)])
def test_tpu_restart_after_preemption(slice2, restart, recreate):
    """The slice is preempted (the training saved and exited 143). With --restart 1 --recreate: delete the queued
    resource, create it with the same flags, copy, set up and rerun the same command. Without --recreate the slice
    is left as it is (Spot or reserved capacity) and watch exits 3 saying what to do."""
    tmp_path, env, homes, set_plans = slice2
    set_plans(["preempt", "0"], ["preempt", "0"])
    out = run_launcher(TPU, ["run", "--watch", "--type", "v4-16", "--spot", "--restart", str(restart),
                             *["--recreate"] * recreate, "--", *TRAIN], env, check=False)
    first = "PYTHONUNBUFFERED=1 -m bpo_jax train " + " ".join(TRAIN)
    if not recreate:
        assert out.returncode == 3, out.stdout + out.stderr
        assert "queued resource bpo-pod is PREEMPTED" in out.stderr and "no --recreate" in out.stderr
        assert not _qr_calls(tmp_path, "create") and not _qr_calls(tmp_path, "delete")
        assert [_runs(h) for h in homes] == [[first]] * 2
        return
    assert out.returncode == 0, out.stdout + out.stderr
    assert "restart 1 of 1: deleting and re-creating bpo-pod" in out.stdout
    assert "finished on every worker" in out.stdout
    assert [_runs(h) for h in homes] == [[first, first]] * 2  # the identical command, once more
    calls = gcloud_calls(tmp_path)
    loc = ["--zone=us-west4-a", "--project=my-proj"]
    assert _qr_calls(tmp_path, "delete") == [["compute", "tpus", "queued-resources", "delete", "bpo-pod", *loc,
                                              "--force", "--quiet"]]
    assert _qr_calls(tmp_path, "create") == [["compute", "tpus", "queued-resources", "create", "bpo-pod",
                                              "--node-id=bpo-pod", *loc, "--accelerator-type=v4-16",
                                              "--runtime-version=tpu-ubuntu2204-base", "--spot"]]
    i = calls.index(_qr_calls(tmp_path, "create")[0])
    assert calls.index(_qr_calls(tmp_path, "delete")[0]) < i
    after = [c[-1] for c in calls[i:] if c[2:4] == ["tpu-vm", "ssh"]]  # copy, setup, then the training again
    assert "tar -xzf bpo_jax-src.tar.gz" in after[0] and "bpo_setup requirements-tpu.txt" in after[1]
    assert "nohup python -m bpo_jax train" in after[2]
    assert (homes[0] / "bpo_jax/launch/tpu_pod.sh").is_file()  # copied to the new slice


@pytest.mark.slow
@pytest.mark.parametrize("recreate", [False, True])
def test_tpu_a_dead_host(slice2, recreate):
    """Worker 1's host goes down: after --missed-polls polls without its report, stop the rest; re-create the
    slice and rerun only with --recreate, else exit 3 and delete nothing."""
    tmp_path, env, homes, set_plans = slice2
    set_plans(["sleep", "0"], ["die", "0"])
    out = run_launcher(TPU, ["run", "--type", "v4-16", "--restart", "1", "--missed-polls", "3",
                             *["--recreate"] * recreate, "--", *TRAIN], env, check=False)
    assert "1 of 2 workers did not answer 3 status polls in a row" in out.stdout + out.stderr
    # 3 misses; under load the first poll can find worker 1 before its fake training started, which also counts
    # as a miss (no report) but is not an unreachable call
    assert len(_missed_polls(tmp_path)) in (2, 3)
    assert (homes[0] / "events").read_text() == "SIGTERM\n"
    if recreate:
        assert out.returncode == 0 and "restart 1 of 1: deleting and re-creating" in out.stdout
        assert len(_qr_calls(tmp_path, "create")) == 1 and [len(_runs(h)) for h in homes] == [2, 2]
    else:
        assert out.returncode == 3 and "no --recreate" in out.stderr, out.stdout + out.stderr
        assert not _qr_calls(tmp_path, "delete") and [len(_runs(h)) for h in homes] == [1, 1]


@pytest.mark.slow
def test_tpu_a_host_missing_a_few_polls_is_not_dead(slice2):
    """Worker 1's host misses two status polls (fewer than --missed-polls, default 5), then its training ends
    well: the watch goes on and ends with exit code 0."""
    tmp_path, env, homes, set_plans = slice2
    set_plans(["0"], ["glitch"])
    out = run_launcher(TPU, ["run", "--watch", "--workers", "2", "--", *TRAIN], env, check=False)
    assert out.returncode == 0 and "finished on every worker" in out.stdout, out.stdout + out.stderr
    assert len(_missed_polls(tmp_path)) >= 2


@pytest.mark.slow
def test_tpu_restarts_follow_the_exit_code_contract(slice2):
    """143 (stopped after saving) is rerun at once; any other failure after a backoff that doubles; each on the same
    slice; 0 ends the watch. Every run's log is kept, after its header."""
    tmp_path, env, homes, set_plans = slice2
    set_plans(["143", "1", "7", "0"], ["sleep", "sleep", "sleep", "0"])
    start = time.time()
    out = run_launcher(TPU, ["run", "--type", "v4-16", "--restart", "3", "--backoff", "0.2", "--", *TRAIN], env)
    assert time.time() - start > 0.6
    restarts = [line.split(": ", 1)[1] for line in out.stdout.splitlines() if ": restart " in line]
    assert restarts == ["restart 1 of 3 on the same slice, now", "restart 2 of 3 on the same slice in 0.2s",
                        "restart 3 of 3 on the same slice in 0.4s"], out.stdout
    assert "exited with code 143 (stopped by SIGTERM after saving)" in out.stdout
    assert "finished on every worker" in out.stdout and [len(_runs(h)) for h in homes] == [4, 4]
    assert not _qr_calls(tmp_path, "create") and not _qr_calls(tmp_path, "delete")
    out = run_launcher(TPU, ["logs", "--workers", "2"], env)
    assert "worker 0: exit code 0 (run 4 in the log; earlier runs: 143, 1, 7)" in out.stdout
    assert "worker 1: exit code 0 (run 4 in the log; earlier runs: 143, 143, 143)" in out.stdout
    log = (tmp_path / "fetched/worker-0.log").read_text()
    assert re.findall(r"^\[tpu_pod\] run started \S+( \(restart \d of 3\))?$", log, re.M) == [
        "", " (restart 1 of 3)", " (restart 2 of 3)", " (restart 3 of 3)"]


@pytest.mark.slow
def test_tpu_no_restart_on_a_config_error(slice2):
    """Exit code 2 means the user must change something: stop every worker and exit 2, even with restarts left."""
    tmp_path, env, homes, set_plans = slice2
    set_plans(["sleep", "0"], ["2", "0"])
    out = run_launcher(TPU, ["run", "--type", "v4-16", "--restart", "3", "--", *TRAIN], env, check=False)
    assert out.returncode == 2 and "the user must change something" in out.stderr, out.stdout + out.stderr
    assert (homes[0] / "events").read_text() == "SIGTERM\n"
    assert [len(_runs(h)) for h in homes] == [1, 1] and not _qr_calls(tmp_path, "create")
