"""``launch/slurm.sh`` under a real Slurm 22.05 (``tests/slurm_local.py``: slurmctld, two slurmd as two simulated
nodes on this machine, munge), started and stopped by this module.

The time-limit test submits a two-node training through the launcher (one JAX process per node, 2 CPU devices
each). Its annotator is an LLM judge served here (``multihost.judge_server``); once phase 2's collection asks it, it
holds the requests and the test lowers the job's time limit so that Slurm's ``--signal=TERM@S`` warning falls due at
once. Slurm checks time limits every 30 s, so the warning reaches the tasks within 30 s; the judge answers again
once the task's log says it received SIGTERM (at most after ``HOLD`` seconds), the tasks stop at their next check
(exit 143, nothing lost: the phase-1 checkpoints are on disk), the job script requeues the job, and the rerun
(time limit raised again) resumes and finishes with the per-step losses of an uninterrupted single process with
the same 4 devices.

The set-up test runs the launcher from a copy of the repo whose ``.venv/bin/python`` only records its calls: the
job installs requirements.txt (CPU nodes) once before the tasks, and every task gets its own BPO_* variables with
node 1 as the coordinator. The exit-code test checks what the job script does with each code of the contract,
under the same real Slurm, with the real program: a configuration error (2) is not requeued, a transient failure
(1) is requeued after the back-off up to ``--max-retries`` and then given up.
"""

import math
import os
import subprocess
import threading
import time

import pytest

import slurm_local
from multihost import assert_same_losses, child_env, judge_server, losses, run_group
from testing import ROOT, launcher_repo, write_minisum_folder

pytestmark = pytest.mark.slow  # a real Slurm and several processes

SIGNAL_SECONDS = 600  # --signal-seconds: the warning falls due once the test lowers the limit to within 10 min
HOLD = 90  # the most seconds the judge holds phase 2's requests waiting for SIGTERM (Slurm checks every 30 s)
DEADLINE = 420  # seconds for one job, every attempt included


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = slurm_local.unavailable()
    if why:
        pytest.skip(why)
    if not os.path.exists(os.path.join(ROOT, ".venv/bin/python")):
        pytest.skip("the job runs the checkout's .venv (launch/test.sh makes it)")
    with slurm_local.slurm_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def _submit(slurm, logs, launcher_args, train_args, repo=ROOT) -> str:
    """Submit through ``repo``'s launch/slurm.sh on the two nodes (CPU, .venv as it is unless ``launcher_args``
    leave out --no-setup); returns the job id."""
    setup = [] if "--setup" in launcher_args else ["--no-setup"]
    out = subprocess.run(["bash", os.path.join(repo, "launch/slurm.sh"), "--nodes", "2", "--gpus-per-node", "0",
                          "--no-exclusive", *setup, "--log-dir", str(logs),
                          *[a for a in launcher_args if a != "--setup"], "--", *train_args],
                         env=child_env(2, **slurm.env), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.split()[-1]  # "Submitted batch job N"


def _wait(slurm, job_id, logs, until, what, deadline=DEADLINE, every=None):
    """Poll the job until ``until(job)`` (``every(job)`` runs at each poll); fail with the logs on timeout or when
    Slurm ended the job in another state."""
    start = time.time()
    while time.time() - start < deadline:
        job = slurm.job(job_id)
        if every is not None:
            every(job)
        if until(job):
            return job
        if job.get("JobState") in ("FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        time.sleep(1)
    texts = [f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(logs.glob("*.log"))]
    pytest.fail(f"job {job_id}: {what} not reached (last: {job})\n" + "\n".join(texts) + "\n" + slurm.log())


def _setting(tiny_policy_and_rm, tmp_path_factory, judge_url):
    data = write_minisum_folder(tmp_path_factory.mktemp("slurm_data"), rows=10)
    return [f"model={tiny_policy_and_rm[0]}", f"data={data}", "annotator=judge", "judge_model=test",
            f"judge_url={judge_url}", "judge_concurrency=1", "total_steps=4", "num_phases=2", "batch_size=4",
            "max_new_tokens=4", "eval_max_new_tokens=4", "eval_size=2", "eval_every=0", "lora_rank=2",
            "learning_rate=5e-3", "checkpoint_every=1", "seed=3", "export_policy=false"]


def test_setup_once_then_one_task_per_node(slurm, tmp_path):
    repo, calls = launcher_repo(tmp_path)
    logs = tmp_path / "logs"
    job_id = _submit(slurm, logs, ["--setup", "--port", "4444"], ["--config", "c.yaml", "note=a b"], repo=repo)
    _wait(slurm, job_id, logs, lambda j: j.get("JobState") == "COMPLETED", "completion", deadline=60)
    lines = calls.read_text().splitlines()
    pip = [line for line in lines if "-r requirements.txt" in line]
    assert len(pip) == 1 and "requirements-gpu" not in pip[0], lines  # once, the CPU build on CPU nodes
    train = sorted(line.strip() for line in lines if "bpo_jax train" in line)
    assert train == [f"BPO_PROCESS_ID={t} BPO_NUM_PROCESSES=2 BPO_COORDINATOR_ADDRESS={slurm_local.NODES[0]}:4444 "
                     f"-m bpo_jax train --config c.yaml note=a b" for t in (0, 1)], lines


def test_time_limit_saves_requeues_and_resumes(slurm, tiny_policy_and_rm, tmp_path_factory):
    runs = tmp_path_factory.mktemp("slurm_runs")
    run_dir, logs = runs / "multi", runs / "logs"
    held = threading.Event()  # set at the first request the judge holds
    state = {"until": None, "log": None}

    def signalled() -> bool:
        return state["log"] is not None and state["log"].exists() and "SIGTERM received" in state["log"].read_text()

    def gate():  # hold phase 2's requests (steps 1-2 are in metrics.jsonl) once, until the tasks have SIGTERM
        metrics = run_dir / "metrics.jsonl"
        if state["until"] is None and metrics.exists() and '"step": 2,' in metrics.read_text():
            state["until"] = time.time() + HOLD
            held.set()
        while state["until"] is not None and time.time() < state["until"] and not signalled():
            time.sleep(0.5)

    httpd = judge_server(gate=gate)
    url = f"http://127.0.0.1:{httpd.server_address[1]}/v1/chat/completions"
    common = _setting(tiny_policy_and_rm, tmp_path_factory, url)
    try:
        job_id = _submit(slurm, logs, ["--job-name", "bpo_tl", "--time", "60", "--signal-seconds",
                                       str(SIGNAL_SECONDS)], [*common, f"run_dir={run_dir}"])
        state["log"] = logs / f"bpo_tl-{job_id}-0.log"
        reference = []  # the uninterrupted run, meanwhile (the gate looks at the job's run_dir only)
        single = threading.Thread(target=lambda: reference.extend(
            run_group([["train", *common, f"run_dir={runs / 'single'}"]], devices=4)))
        single.start()
        lowered = []

        def lower_limit(job):  # the warning falls due now; the limit itself stays >= 100 s away
            if held.is_set() and not lowered and job.get("JobState") == "RUNNING":
                elapsed = int(job["RunTime"].split(":")[-1]) + 60 * int(job["RunTime"].split(":")[-2])
                minutes = math.ceil((elapsed + 100) / 60)
                slurm.run("scontrol", "update", f"JobId={job_id}", f"TimeLimit={minutes}")
                lowered.append(minutes)

        _wait(slurm, job_id, logs, lambda j: int(j.get("Restarts", 0)) >= 1, "a requeue", every=lower_limit)
        slurm.run("scontrol", "update", f"JobId={job_id}", "TimeLimit=60")  # the rerun runs to its end
        job = _wait(slurm, job_id, logs, lambda j: j.get("JobState") == "COMPLETED", "completion")
        single.join()
    finally:
        httpd.shutdown()
    [(rc, out, _)] = reference
    assert rc == 0, out[-3000:]
    assert lowered and job["Restarts"] == "1" and job["ExitCode"] == "0:0", job
    task0 = (logs / f"bpo_tl-{job_id}-0.log").read_text()  # appended to by both attempts
    assert "SIGTERM received" in task0 and "SIGTERM while collecting phase 2's pairs" in task0, task0[-3000:]
    assert f"resumed {run_dir} at step 2" in task0, task0[-3000:]
    batch = (logs / f"bpo_tl-{job_id}.log").read_text()
    assert f"the tasks saved after SIGTERM: requeueing job {job_id}" in batch, batch
    assert_same_losses(losses(run_dir), losses(runs / "single"), [1, 2, 3, 4])


def test_exit_codes_decide_the_requeue(slurm, tiny_policy_and_rm, tmp_path_factory):
    logs = tmp_path_factory.mktemp("slurm_codes")
    url = "http://127.0.0.1:9/v1/chat/completions"  # nothing listens: the judge's retries run out (transient)
    common = _setting(tiny_policy_and_rm, tmp_path_factory, url)
    config_error = _submit(slurm, logs, ["--job-name", "bpo_cfg"], [*common, "total_steps=3", "run_dir=" +
                                                                     str(logs / "cfg")])
    transient = _submit(slurm, logs, ["--job-name", "bpo_tr", "--max-retries", "1", "--retry-backoff", "1"],
                        [*common, "judge_retries=0", "run_dir=" + str(logs / "tr")])
    job = _wait(slurm, config_error, logs, lambda j: j.get("JobState") == "FAILED", "a failed job")
    assert job["Restarts"] == "0" and job["ExitCode"] == "2:0", job
    assert "not requeued" in (logs / f"bpo_cfg-{config_error}.log").read_text()
    job = _wait(slurm, transient, logs, lambda j: j.get("JobState") == "FAILED" and j.get("Restarts") == "1",
                "a failed job after one retry")
    assert job["ExitCode"] == "1:0", job
    batch = (logs / f"bpo_tr-{transient}.log").read_text()
    assert "a transient failure: retry 1 of 1 in 1 s" in batch and "after 1 retries: giving up" in batch, batch
