"""A fake ``gcloud`` for the launch/tpu_pod.sh tests (a TPU slice cannot run here), and the helpers those tests
share: ``fake_gcloud_env(tmp_path)`` puts it first on a PATH and returns the environment the launcher runs under;
``gcloud_calls`` reads back the argv of every gcloud call; ``run_launcher`` runs a launch script; ``dry_run`` the
commands ``tpu_pod.sh --dry-run`` prints. Used by tests/test_tpu_pod*.py and tests/test_launch.py."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TPU = ROOT / "launch" / "tpu_pod.sh"
SLURM = ROOT / "launch" / "slurm.sh"
TRAIN = ["--config", "configs/tldr_gemma2b.yaml", "model=models/gemma-2b", "reward_model=models/rm",
         "run_dir=gs://bkt/runs/x"]


def executable(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` and make it executable."""
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


def fake_gcloud_env(tmp_path):
    """PATH with the fake gcloud (and a marker: sbatch/srun/scontrol fail loudly if called): (tmp_path, env), the
    environment launch/tpu_pod.sh runs under (the slice bpo-pod in us-west4-a of my-proj, logs to tmp_path/fetched)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(bin_dir / "gcloud", FAKE_GCLOUD.replace("PYTHON", sys.executable))
    for name in ("sbatch", "srun", "scontrol"):
        executable(bin_dir / name, f"#!/bin/sh\necho {name} >> '{tmp_path}/called'\nexit 9\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_") and k != "PYTHONUNBUFFERED"}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_LOG=str(tmp_path / "gcloud.log"), TMPDIR=str(tmp_path),
               TPU_NAME="bpo-pod", TPU_ZONE="us-west4-a", TPU_PROJECT="my-proj", TPU_POLL_SECONDS="0",
               TPU_LOGS_DIR=str(tmp_path / "fetched"))
    return tmp_path, env


def gcloud_calls(tmp_path):
    """The argv of every fake gcloud call so far, in order."""
    log = tmp_path / "gcloud.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def run_launcher(script, args, env, check=True):
    """``bash script args`` under ``env``; with ``check``, fail the test unless it exits 0."""
    out = subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=60)
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


def dry_run(args, env):
    """The commands ``tpu_pod.sh --dry-run args`` prints (its ``+ `` lines), without the ``+ ``."""
    out = run_launcher(TPU, ["--dry-run", *args], env)
    return [line[2:] for line in out.stdout.splitlines() if line.startswith("+ ")]
