"""launch/tpu_pod.sh's commands without Google Cloud: what --dry-run prints for each (and that it runs none),
single- and multislice, the refusals, how many workers each TPU type has, and the argv that create and run give the
fake gcloud (tests/fake_gcloud.py). The fake workers' runs are in tests/test_tpu_pod_workers.py, watch and its
restarts in tests/test_tpu_pod_watch.py."""

import shlex
import subprocess

import pytest

from fake_gcloud import TPU, TRAIN, dry_run, fake_gcloud_env, gcloud_calls, run_launcher


@pytest.fixture
def fake(tmp_path):
    """PATH with the fake gcloud (and a marker: sbatch/srun/scontrol fail loudly if called); (tmp_path, env)."""
    return fake_gcloud_env(tmp_path)


def test_tpu_help_documents_the_restart_settings():
    out = subprocess.run(["bash", str(TPU), "--help"], capture_output=True, text=True).stdout
    for word in ("--missed-polls N", "TPU_MISSED_POLLS", "--backoff S", "TPU_RESTART_BACKOFF", "--recreate",
                 "143", "exit 3"):
        assert word in out, word


def test_tpu_dry_run_prints_the_commands_and_runs_none(fake):
    tmp_path, env = fake
    create = dry_run(["create", "--type", "v5litepod-16", "--spot"], env)
    assert create[0] == ("gcloud compute tpus queued-resources create bpo-pod --node-id=bpo-pod --zone=us-west4-a "
                         "--project=my-proj --accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite "
                         "--spot")
    assert "queued-resources describe bpo-pod" in create[1] and "state.state" in create[1]
    assert "--reserved" in dry_run(["create", "--type", "v4-32", "--reserved", "--runtime=tpu-ubuntu2204-base"], env)[0]

    copy = "\n".join(dry_run(["copy", "--model-dir", "/local/gemma:models/gemma-2b",
                           "--data-dir", "gs://bkt/tldr:data/tldr"], env))
    assert "git -C" in copy and "ls-files" in copy and "tpu-vm scp" in copy and "--worker=all" in copy
    assert "tar -C /local/gemma -cf" in copy and "-C bpo_jax/models/gemma-2b" in copy
    assert "gcloud storage rsync --recursive gs://bkt/tldr bpo_jax/data/tldr" in copy

    (setup,) = dry_run(["setup"], env)
    assert setup.startswith("gcloud compute tpus tpu-vm ssh bpo-pod ") and "--worker=all" in setup
    assert "source launch/_setup.sh && bpo_setup requirements-tpu.txt" in setup
    assert "sudo rm -f /tmp/libtpu_lockfile" in setup and "lsof -t -w /dev/accel*" in setup

    (run,) = dry_run(["run", "--type", "v5litepod-16", "--", *TRAIN], env)
    assert "--worker=all" in run and "nohup python -m bpo_jax train " + " ".join(TRAIN) in run
    assert "bpo_logs/bpo-pod.log" in run
    # stale TPU holders go first, with setup's very command (one code path), then the unbuffered training
    clear = setup[setup.index("sudo rm -f /tmp/libtpu_lockfile"):].rstrip("'")
    assert clear in run and "lsof -t -w /dev/accel*" in clear
    assert run.index(clear) < run.index("export PYTHONUNBUFFERED=1") < run.index("nohup python")

    logs = dry_run(["logs", "--workers", "2"], env)
    assert [c.split()[5:7] for c in logs[1:]] == [["bpo-pod:bpo_logs/bpo-pod.log", f"{tmp_path}/fetched/worker-0.log"],
                                                 ["bpo-pod:bpo_logs/bpo-pod.log", f"{tmp_path}/fetched/worker-1.log"]]
    assert "--worker=1" in logs[2]
    assert "tail -n 100 -F bpo_logs/bpo-pod.log" in dry_run(["logs", "--follow"], env)[0]
    (stop,) = dry_run(["stop"], env)
    assert "--worker=all" in stop and "pkill -TERM" in stop and clear in stop

    # run --restart: start, then watch (describe + every worker's state, as status)
    run, describe, state = dry_run(["run", "--type", "v4-16", "--spot", "--restart", "2", "--", *TRAIN], env)
    assert "nohup python -m bpo_jax train" in run and "queued-resources describe bpo-pod" in describe
    assert "--worker=all" in state and "exited with code" in state
    assert dry_run(["watch", "--workers", "2"], env) == [describe, state]
    assert len(dry_run(["run", "--watch", "--workers", "2", "--", *TRAIN], env)) == 3
    assert dry_run(["delete"], env) == [
        "gcloud compute tpus queued-resources delete bpo-pod --zone=us-west4-a --project=my-proj --force --quiet"]
    assert "tpu-vm ssh" in dry_run(["status"], env)[1]
    assert gcloud_calls(tmp_path) == [] and not (tmp_path / "called").exists()  # nothing ran


def test_printed_commands_are_shell_words(fake):
    """A train arg with quotes and spaces survives: the printed --command parses back to the same words."""
    _, env = fake
    (run,) = dry_run(["run", "--workers", "1", "--", "--config", "configs/tldr_gemma2b.yaml", "note=it's a b"], env)
    command = next(w for w in shlex.split(run) if w.startswith("--command="))
    assert "'note=it'\\''s a b'" in command
    assert subprocess.run(["bash", "-n", "-c", command.split("=", 1)[1]]).returncode == 0


@pytest.mark.parametrize("args, message", [
    (["run", "--type", "v4-32", "--worker", "0", "--", *TRAIN], "--worker=all"),
    (["run", "--type", "v4-32", "--", "--config", "configs/tldr_gemma2b.yaml", "run_dir=/home/me/runs/x"], "gs://"),
    (["run", "--workers", "4", "--", "--config", "configs/tldr_gemma2b.yaml"], "runs/tldr_gemma2b"),  # config's
    (["run", "--type", "v4-32"], "train arguments"),
    (["create", "--type", "v4-32", "--spot", "--reserved"], "exclude"),
    (["create"], "--type"),
    (["bogus"], "unknown command"),
    (["setup", "--zone"], "needs a value"),
    (["run", "--workers", "2", "--restart", "1", "--recreate", "--", *TRAIN], "--recreate needs --type"),
    (["run", "--type", "v4-16", "--watch", "--recreate", "--", *TRAIN], "--restart N"),
    (["watch", "--type", "v4-16", "--missed-polls", "0"], "--missed-polls"),
    (["watch", "--type", "v4-16", "--backoff", "1m"], "--backoff"),
    (["run", "--type", "v4-16", "--restart", "x", "--", *TRAIN], "not a number"),
    (["watch", "--type", "v4-16", "--restart", "1"], "train arguments"),
    (["copy", "--stage", "/mnt/stage", "--model-dir", "m:models/m"], "--stage '/mnt/stage'"),
    (["run", "--workers", "1", "--env", "BPO_TEST_UNSET", "--", *TRAIN], "BPO_TEST_UNSET is not set in this shell"),
    (["run", "--workers", "1", "--env=HF-TOKEN", "--", *TRAIN], "--env 'HF-TOKEN' is not a variable name"),
    (["run", "--workers", "1", "--env"], "--env needs a value"),
])
def test_tpu_refusals(fake, args, message):
    tmp_path, env = fake
    out = run_launcher(TPU, ["--dry-run", *args], env, check=False)
    assert out.returncode != 0 and message in out.stderr, out.stderr
    assert gcloud_calls(tmp_path) == []


def test_tpu_single_worker_allows_a_worker_and_a_local_run_dir(fake):
    _, env = fake
    (run,) = dry_run(["run", "--type", "v5litepod-8", "--worker", "0", "--", "--config", "x.yaml", "run_dir=runs/x"],
                     env)
    assert "--worker=0" in run


def test_tpu_worker_count_by_type(fake):
    _, env = fake
    for tpu_type, n in [("v4-8", 1), ("v4-32", 4), ("v5p-16", 2), ("v5litepod-8", 1), ("v5litepod-16", 4),
                        ("v6e-256", 64), ("v3-8", 1)]:
        assert len(dry_run(["logs", "--type", tpu_type], env)) == 1 + n, tpu_type
    out = run_launcher(TPU, ["--dry-run", "logs", "--type", "v9-8"], env, check=False)
    assert out.returncode != 0 and "--workers" in out.stderr


def test_tpu_create_and_run_argv(fake):
    tmp_path, env = fake
    run_launcher(TPU, ["create", "--type", "v4-32", "--spot"], env)
    run_launcher(TPU, ["run", "--type", "v4-32", "--", *TRAIN], env)
    calls = gcloud_calls(tmp_path)
    loc = ["--zone=us-west4-a", "--project=my-proj"]
    assert calls[0] == ["compute", "tpus", "queued-resources", "create", "bpo-pod", "--node-id=bpo-pod", *loc,
                        "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base", "--spot"]
    assert calls[1] == ["compute", "tpus", "queued-resources", "describe", "bpo-pod", *loc,
                        "--format=value(state.state)"]
    assert calls[2][:9] == ["compute", "tpus", "tpu-vm", "ssh", "bpo-pod", *loc, "--worker=all", "--quiet"]
    assert "python -m bpo_jax train " + " ".join(TRAIN) in calls[2][-1] and len(calls) == 3


def test_tpu_multislice_dry_run_addresses_every_worker_of_every_slice(fake):
    """--num-slices 2: one queued resource with two nodes (bpo-pod-0, bpo-pod-1); every command reaches both, and
    `run` gives slice s's workers the MEGASCALE_* variables of slice s, coordinated by worker 0 of bpo-pod-0."""
    tmp_path, env = fake
    two = ["--num-slices", "2", "--type", "v5litepod-16"]
    create = dry_run(["create", *two, "--spot"], env)
    assert create[0] == ("gcloud compute tpus queued-resources create bpo-pod --node-count=2 --node-prefix=bpo-pod "
                         "--zone=us-west4-a --project=my-proj --accelerator-type=v5litepod-16 "
                         "--runtime-version=v2-alpha-tpuv5-lite --spot")
    describe, *starts = dry_run(["run", *two, "--", *TRAIN], env)
    assert describe.startswith("gcloud compute tpus tpu-vm describe bpo-pod-0 ") and "networkEndpoints[0]" in describe
    assert [c.split()[5] for c in starts] == ["bpo-pod-0", "bpo-pod-1"]
    for s, start in enumerate(starts):
        assert "--worker=all" in start and "nohup python -m bpo_jax train " + " ".join(TRAIN) in start
        assert (f"export MEGASCALE_COORDINATOR_ADDRESS=COORDINATOR_IP:8080 MEGASCALE_NUM_SLICES=2 "
                f"MEGASCALE_SLICE_ID={s} MEGASCALE_PORT=8080 && ") in start
    for command in (["setup"], ["stop"], ["status"], ["copy"], ["watch", "--workers", "4"]):
        nodes = [c.split()[5] for c in dry_run([*command, *two], env) if " tpu-vm ssh " in c]
        assert nodes == ["bpo-pod-0", "bpo-pod-1"], command
    logs = dry_run(["logs", *two], env)[1:]
    assert [c.split()[5:7] for c in logs] == [[f"bpo-pod-{s}:bpo_logs/bpo-pod.log",
                                               f"{tmp_path}/fetched/slice-{s}-worker-{i}.log"]
                                              for s in range(2) for i in range(4)]
    assert "--worker=3" in logs[7] and " tpu-vm ssh bpo-pod-0 " in " " + dry_run(["logs", "--follow", *two], env)[0]
    out = run_launcher(TPU, ["--dry-run", "run", "--num-slices", "x", "--", *TRAIN], env, check=False)
    assert out.returncode != 0 and "--num-slices 'x'" in out.stderr
    assert gcloud_calls(tmp_path) == []  # nothing ran
