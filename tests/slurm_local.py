"""A real Slurm on this machine for the tests: Debian's ``slurmctld`` + ``slurmd`` (Slurm 22.05) with munge, as a
two-node cluster whose nodes are simulated on this host (one ``slurmd`` each, on its own port), started and
stopped by the suite, without systemd.

``slurm_cluster(base)`` is a context manager that writes ``base/slurm.conf``, starts munged (when none runs),
``slurmctld`` and one ``slurmd`` per node, waits until every node is idle, yields a ``Cluster`` (the environment
clients need: ``SLURM_CONF``) and stops what it started, by PID file, at the end. ``unavailable()`` says why a
real Slurm cannot run here (None when it can), installing the Debian packages first when this process is root
and they are missing.

What the real Slurm does that a stand-in would have to guess (measured on a 2-core machine, Slurm 22.05.8):
``--signal=TERM@S`` (no ``B:``) sends SIGTERM to the tasks S seconds before the time limit (the controller checks
time limits every 30 s, so it comes up to 30 s late), more than once; ``--signal=B:TERM@S`` reaches only the batch
shell; a TERM that the batch shell passes on to ``srun`` makes srun kill the tasks (SIGKILL, exit 137) before they
can save; ``scontrol requeue`` sends CONT + TERM to the tasks and restarts the job with ``SLURM_RESTART_COUNT``
one higher (~10 s later with ``cred_expire=10``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
NODES = ("bpo-n1", "bpo-n2")  # simulated nodes; /etc/hosts gets them on loopback (the launcher resolves node 1)


class Cluster(NamedTuple):
    base: Path
    env: dict  # SLURM_CONF (and PATH): what a client command needs

    def run(self, *argv: str, check: bool = True) -> str:
        out = subprocess.run(argv, env={**os.environ, **self.env}, capture_output=True, text=True, timeout=60)
        if check and out.returncode:
            raise RuntimeError(f"{' '.join(argv)} exited {out.returncode}: {out.stderr or out.stdout}")
        return out.stdout

    def job(self, job_id: str) -> dict:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, RunTime, ...); {} once Slurm forgot it."""
        text = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        return dict(f.split("=", 1) for f in text.split() if "=" in f)

    def log(self, lines: int = 40) -> str:
        """The daemons' last log lines (for a failing test's message)."""
        parts = []
        for f in sorted((self.base / "log").glob("*.log")):
            parts.append(f"== {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(parts)


def unavailable() -> str | None:
    """None when a real Slurm can run here; else why not. As root, installs the Debian packages when missing."""
    if shutil.which("slurmctld") and shutil.which("slurmd") and shutil.which("sbatch") and shutil.which("munged"):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"a real Slurm needs the Debian packages {' '.join(PACKAGES)} (installing them needs root and apt-get)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    if subprocess.run(install, env=env, capture_output=True).returncode:  # a fresh machine: no package lists yet
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        out = subprocess.run(install, env=env, capture_output=True, text=True)
        if out.returncode:
            return f"apt-get could not install {' '.join(PACKAGES)}: {out.stderr.strip()[-500:]}"
    return None


def _free_ports(n: int) -> list[int]:
    """``n`` consecutive free loopback ports (slurm.conf gives the nodes' slurmd ports as a range)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + n > 65000:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for port in range(first, first + n):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            return list(range(first, first + n))
        except OSError:
            continue
    raise RuntimeError(f"no {n} consecutive free ports")


def _config(base: Path, cpus: int) -> str:
    ctld, *slurmd = _free_ports(1 + len(NODES))
    host = socket.gethostname().split(".")[0]
    nodes = f"{NODES[0][:-1]}[1-{len(NODES)}]"
    return f"""\
ClusterName=bpoci
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
SlurmctldPort={ctld}
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool/%n
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd-%n.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
SlurmdParameters=config_overrides
ReturnToService=2
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=30
Waittime=0
NodeName={nodes} NodeHostname={host} NodeAddr=127.0.0.1 Port=[{slurmd[0]}-{slurmd[-1]}] CPUs={cpus} \
RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={nodes} Default=YES MaxTime=INFINITE State=UP
"""


def _resolve_nodes() -> None:
    """Put the simulated nodes on loopback in /etc/hosts (the launcher's coordinator is node 1's name)."""
    missing = []
    for name in NODES:
        try:
            socket.gethostbyname(name)
        except OSError:
            missing.append(name)
    if missing:
        with open("/etc/hosts", "a") as f:
            f.write(f"127.0.0.1 {' '.join(missing)}  # bpo_jax tests: simulated Slurm nodes\n")


def _start_munge() -> bool:
    """Start munged unless one answers already; True when this call started it."""
    if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
        return False
    run = Path("/run/munge")
    run.mkdir(parents=True, exist_ok=True)
    shutil.chown(run, "munge", "munge")
    key = Path("/etc/munge/munge.key")
    if not key.exists() or key.stat().st_size == 0:
        subprocess.run(["mungekey", "-c", "-k", str(key)], check=True)
        shutil.chown(key, "munge", "munge")
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
    subprocess.run("munge -n | unmunge", shell=True, check=True, capture_output=True)
    return True


def _stop(pid_file: Path) -> None:
    """SIGTERM, then SIGKILL after 5 s (a slurmd whose job steps are still ending does not exit on TERM)."""
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, 15)
    except (OSError, ValueError):
        return
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except OSError:
            return
        time.sleep(0.1)
    with contextlib.suppress(OSError):
        os.kill(pid, 9)


@contextlib.contextmanager
def slurm_cluster(base: Path, cpus: int = 8):
    """A running two-node Slurm (see the module docstring); ``cpus`` per node (more than the machine has is
    allowed: ``config_overrides``)."""
    base = Path(base)
    for sub in ("spool", "state", "log"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    conf = base / "slurm.conf"
    conf.write_text(_config(base, cpus))
    cluster = Cluster(base, {"SLURM_CONF": str(conf)})
    _resolve_nodes()
    started_munge = _start_munge()
    try:
        subprocess.run(["slurmctld", "-f", str(conf)], check=True, env={**os.environ, **cluster.env})
        for name in NODES:
            subprocess.run(["slurmd", "-f", str(conf), "-N", name], check=True, env={**os.environ, **cluster.env})
        for _ in range(60):
            idle = cluster.run("sinfo", "-h", "-N", "-t", "idle", "-o", "%N", check=False).split()
            if sorted(idle) == sorted(NODES):
                break
            time.sleep(1)
        else:
            raise RuntimeError(f"the Slurm nodes did not become idle in 60 s\n{cluster.log()}")
        yield cluster
    finally:
        cluster.run("scancel", "--full", "-u", "root", check=False)
        for _ in range(30):  # the jobs' processes end before their slurmd does
            if not cluster.run("squeue", "-h", check=False).strip():
                break
            time.sleep(0.5)
        for pid_file in [*base.glob("slurmd-*.pid"), base / "slurmctld.pid"]:
            _stop(pid_file)
        if started_munge:
            _stop(Path("/run/munge/munged.pid"))
