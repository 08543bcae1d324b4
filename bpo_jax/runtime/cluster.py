"""Process start-up: join the run's processes before anything touches a device, and find compiled programs
again on a restart.

``initialize(environ=None)`` is called by ``python -m bpo_jax train|evaluate|generate`` before the command
imports anything that touches a device. It decides only *whether* this process is one of several and *which*
launch environment started it, then calls ``jax.distributed.initialize`` with explicit arguments or with JAX's
own cluster detection for that environment. In order of precedence:

==================  ==========================================================================================
environment         detected by (the first that matches wins)
==================  ==========================================================================================
bpo_jax             ``BPO_COORDINATOR_ADDRESS``, ``BPO_NUM_PROCESSES``, ``BPO_PROCESS_ID`` (all three, or none;
                    optional ``BPO_LOCAL_DEVICE_IDS=0,1``): passed to JAX as they are, with JAX's cluster detection
                    off, so the process sees every local device (``launch/slurm.sh``: one process per node)
JAX                 ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` (all three; JAX
                    itself reads ``JAX_LOCAL_DEVICE_IDS``)
Open MPI            ``mpirun``: ``OMPI_COMM_WORLD_SIZE`` > 1; JAX's ``ompi`` detection (``OMPI_MCA_orte_hnp_uri``)
SLURM               a multi-task job step: ``SLURM_NTASKS`` > 1; JAX's ``slurm`` detection (one device per task,
                    its ``SLURM_LOCALID``, unless ``JAX_LOCAL_DEVICE_IDS`` says otherwise)
GKE TPU pod         a TPU VM with ``TPU_WORKER_HOSTNAMES`` / ``TPU_PROCESS_ADDRESSES`` naming several workers
                    (or ``MEGASCALE_NUM_SLICES`` > 1); JAX's ``gketpu`` detection
Cloud TPU VM        a TPU VM whose metadata names several workers; JAX's ``gcetpu`` detection
==================  ==========================================================================================

``JAX_COORDINATOR_ADDRESS`` alone overrides the coordinator that Open MPI, SLURM or TPU detection would pick.
One process (a count of 1, or no environment above) does nothing; so does ``BPO_DISTRIBUTED=off`` and a process
already initialised. A half-set environment (e.g. ``JAX_NUM_PROCESSES`` without ``JAX_PROCESS_ID``, or
``mpirun`` without the variable JAX needs to find the coordinator) raises ``ValueError`` naming what is missing,
before any connection is tried. On success one line goes to the ``bpo_jax`` logger: the environment and this
process's index and count.

A dead peer ends the group in bounded time. Every process sends heartbeats to the coordination service (on
process 0); a process silent for ``heartbeat_timeout`` seconds (``BPO_HEARTBEAT_TIMEOUT``, default 30; JAX's own
is 100) is declared dead and JAX aborts every other process with a fatal error ("Terminating process because the
JAX distributed service detected fatal errors ... heartbeat timeout": SIGABRT, exit status -6 / 134). Bound: every
survivor exits within ``heartbeat_timeout + 30`` seconds of a peer's death (``DEAD_PEER_BOUND`` = 60 s with the
default). Measured on CPU (gloo, 2 processes, process 1 SIGKILLed mid-train, tests/runtime/test_dead_peer.py): 18-27 s
with 30, 7 s with 10, 61 s with JAX's 100; when process 0 (the coordinator) dies the others abort within 1 s.
An exiting process waits for the others at JAX's shutdown barrier up to ``BPO_SHUTDOWN_TIMEOUT`` seconds
(default 60; JAX's own is 300), and the barrier's timeout aborts every process: so a host that fails alone while
the others sit in a collective (an error no shared decision caught) ends the group within that time
(measured on CPU with 10 s: both processes aborted 13 s after the failing one exited). Commands
end with a barrier of their own after process 0's last writes (``train``'s export), so a finished run's hosts
reach the shutdown barrier together. Start-up waits up to
``BPO_INITIALIZATION_TIMEOUT`` seconds (default 300, JAX's own) for every process to connect, then fails.

``enable_compilation_cache(run_dir)`` turns on JAX's persistent compilation cache in a folder every host and every
restart of the run sees (``<run_dir>/compile_cache``; ``BPO_COMPILATION_CACHE=<dir>`` elsewhere, ``=off`` none),
so a resumed run loads its compiled programs instead of compiling them again.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import NamedTuple

import jax

log = logging.getLogger(__name__)

BPO_VARS = ("BPO_COORDINATOR_ADDRESS", "BPO_NUM_PROCESSES", "BPO_PROCESS_ID")
JAX_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
HEARTBEAT_TIMEOUT = 30  # seconds without a heartbeat before a process is declared dead (JAX's default: 100)
SHUTDOWN_TIMEOUT = 60  # seconds an exiting process waits for the others at the shutdown barrier (JAX's: 300)
INITIALIZATION_TIMEOUT = 300  # seconds start-up waits for every process to connect (JAX's default)
DEAD_PEER_BOUND = HEARTBEAT_TIMEOUT + 30  # seconds from a peer's death to every survivor's exit (default heartbeat)
MIN_COMPILE_SECONDS = 0.1  # programs that compile faster than this are not worth a cache entry


class Launch(NamedTuple):
    """A multi-process launch: its environment's name, the process count and index where known before
    joining (None: JAX's detection finds them), and the keyword arguments for ``jax.distributed.initialize``."""

    name: str
    num_processes: int | None
    process_id: int | None
    kwargs: dict


def initialize(environ=None) -> Launch | None:
    """Join the run's processes (``jax.distributed.initialize``) before anything touches a device.

    ``environ`` (default ``os.environ``) decides the environment; JAX's own detection for Open MPI, SLURM and
    TPU reads ``os.environ``. Returns the launch joined, or None when nothing was done (one process,
    ``BPO_DISTRIBUTED=off``, already initialised). Raises ``ValueError`` for a half-set environment, and on
    process 0 for a coordinator port that a process on this host already listens on (``refuse_busy_port``)."""
    env = os.environ if environ is None else environ
    if jax.distributed.is_initialized():
        return None
    launch = detect(env)
    if launch is None:
        return None
    port = coordinator_port(launch, env)
    if port is not None:
        refuse_busy_port(port)
    jax.distributed.initialize(**launch.kwargs, **timeouts(env))
    from jax._src.distributed import global_state as state  # what JAX joined: also the ids its detection found

    log.info("bpo_jax: joined %s: process %d of %d processes", launch.name, state.process_id, state.num_processes)
    return launch


def refuse_busy_port(port: int) -> None:
    """Raise ``ValueError`` when a process on this host already listens on ``port``, where this process 0 is about
    to start the coordination service. JAX binds that port with ``SO_REUSEPORT``, so a second service on a busy
    port (another job's coordinator, e.g. two jobs given the same ``--port`` on one node) starts without an
    error; the two jobs' processes then join either service, and the first "different incarnation" aborts the
    other job (exit -6). Checked by a connection to the port on loopback."""
    with socket.socket() as probe:
        probe.settimeout(5)
        if probe.connect_ex(("127.0.0.1", port)) != 0:
            return
    raise ValueError(f"the coordinator's port {port} is already in use on this host, where process 0 starts the "
                     f"coordination service: another job's coordinator? Two services on one port would abort "
                     f"each other's jobs; give this job another port (launch/slurm.sh --port, "
                     f"BPO_COORDINATOR_ADDRESS or JAX_COORDINATOR_PORT)")


def coordinator_port(launch: Launch, env) -> int | None:
    """The port this process will serve the coordination service on, when it is process 0 and both are known
    from the environment alone; else None (another process, or a TPU slice, whose coordinator comes from its
    metadata server)."""
    address = launch.kwargs.get("coordinator_address")
    if launch.kwargs.get("cluster_detection_method") == "slurm":
        if int(env["SLURM_PROCID"]) != 0:
            return None
        if not address:  # JAX's SLURM rule (jax/_src/clusters/slurm_cluster.py; test_cluster.py holds them equal)
            return int(env.get("JAX_COORDINATOR_PORT") or int(env["SLURM_JOB_ID"]) % 2**12 + 65535 - 2**12 + 1)
    elif launch.process_id != 0 or not address:
        return None
    return int(address.rsplit(":", 1)[1])


def timeouts(env) -> dict:
    """``jax.distributed.initialize``'s timeouts in whole seconds: heartbeat (``BPO_HEARTBEAT_TIMEOUT``), shutdown
    (``BPO_SHUTDOWN_TIMEOUT``), start-up (``BPO_INITIALIZATION_TIMEOUT``)."""
    return dict(heartbeat_timeout_seconds=_positive_int(env, "BPO_HEARTBEAT_TIMEOUT", HEARTBEAT_TIMEOUT),
                shutdown_timeout_seconds=_positive_int(env, "BPO_SHUTDOWN_TIMEOUT", SHUTDOWN_TIMEOUT),
                initialization_timeout=_positive_int(env, "BPO_INITIALIZATION_TIMEOUT", INITIALIZATION_TIMEOUT))


def detect(environ=None) -> Launch | None:
    """The multi-process launch this process belongs to (see the module docstring's table), or None for a
    single process or ``BPO_DISTRIBUTED=off``. Connects to nothing; raises ``ValueError`` when half-set."""
    env = os.environ if environ is None else environ
    switch = env.get("BPO_DISTRIBUTED", "auto")
    if switch not in ("auto", "off"):
        raise ValueError(f"BPO_DISTRIBUTED={switch!r}: use auto (the default) or off")
    if switch == "off":
        return None
    for probe in (_bpo_vars, _jax_vars, _open_mpi, _slurm, _tpu):
        launch = probe(env)
        if launch is not None:
            return launch if launch.num_processes != 1 else None
    if env.get("JAX_COORDINATOR_ADDRESS"):
        raise ValueError("JAX_COORDINATOR_ADDRESS is set but JAX_NUM_PROCESSES, JAX_PROCESS_ID are not, and no "
                         "Open MPI, SLURM or TPU environment gives them; set all three")
    return None


def _positive_int(env, key: str, default: int) -> int:
    text = env.get(key, "")
    if not text:
        return default
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{key}={text!r} must be a positive whole number of seconds")
    return int(text)


def _count_and_index(env, keys) -> tuple[int, int]:
    """``(num_processes, process_id)`` from ``keys`` = (coordinator, count, id), every one of them set."""
    try:
        n, i = int(env[keys[1]]), int(env[keys[2]])
    except ValueError:
        raise ValueError(f"{keys[1]}={env[keys[1]]!r} and {keys[2]}={env[keys[2]]!r} must be whole numbers") from None
    if not 0 <= i < n:
        raise ValueError(f"{keys[2]}={i} must be in [0, {keys[1]}={n})")
    return n, i


def _bpo_vars(env) -> Launch | None:
    present = [k for k in BPO_VARS if env.get(k)]
    if not present:
        return None
    missing = [k for k in BPO_VARS if not env.get(k)]
    if missing:
        raise ValueError(f"{present[0]} is set but {', '.join(missing)} is not; set all three "
                         f"(or none, on a TPU slice or under SLURM)")
    n, i = _count_and_index(env, BPO_VARS)
    ids = env.get("BPO_LOCAL_DEVICE_IDS")
    # Everything is given: JAX's own detection is off. Left on, its SLURM detection (SLURM_JOB_ID is set in every
    # Slurm job) would restrict each process to the one GPU of its SLURM_LOCALID, so a process per node would
    # train on one of the node's GPUs without a word.
    return Launch("bpo_jax's BPO_* variables", n, i,
                  dict(coordinator_address=env["BPO_COORDINATOR_ADDRESS"], num_processes=n, process_id=i,
                       local_device_ids=[int(x) for x in ids.split(",")] if ids else None,
                       cluster_detection_method="deactivate"))


def _jax_vars(env) -> Launch | None:
    if not (env.get("JAX_NUM_PROCESSES") or env.get("JAX_PROCESS_ID")):
        return None  # JAX_COORDINATOR_ADDRESS alone: an override for a detected cluster (or an error, in detect)
    missing = [k for k in JAX_VARS if not env.get(k)]
    if missing:
        present = [k for k in JAX_VARS if env.get(k)]
        raise ValueError(f"{', '.join(present)} {'is' if len(present) == 1 else 'are'} set but "
                         f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not; set all three")
    n, i = _count_and_index(env, JAX_VARS)
    return Launch("JAX's JAX_* variables", n, i,
                  dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"], num_processes=n, process_id=i))


def _detected(name: str, method: str, n: int | None, env) -> Launch:
    """A launch whose count, index and coordinator JAX's ``method`` detection finds (from ``os.environ``);
    ``JAX_COORDINATOR_ADDRESS`` overrides the coordinator."""
    return Launch(name, n, None, dict(coordinator_address=env.get("JAX_COORDINATOR_ADDRESS") or None,
                                      cluster_detection_method=method))


def _open_mpi(env) -> Launch | None:
    n = int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1)
    if n < 2:
        return None
    if not env.get("OMPI_MCA_orte_hnp_uri") and not env.get("JAX_COORDINATOR_ADDRESS"):
        raise ValueError(f"an Open MPI launch of {n} processes without OMPI_MCA_orte_hnp_uri (Open MPI 5 does not "
                         f"set it), from which JAX finds the coordinator; set JAX_COORDINATOR_ADDRESS=host:port")
    if not env.get("OMPI_MCA_orte_hnp_uri"):  # JAX's ompi detection needs the URI: count and rank given here
        i = int(env.get("OMPI_COMM_WORLD_RANK", "0"))
        return Launch("Open MPI", n, i, dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"], num_processes=n,
                                             process_id=i))
    return _detected("Open MPI", "ompi", n, env)


def _slurm(env) -> Launch | None:
    n = int(env.get("SLURM_NTASKS", "1") or 1)
    if n < 2 or "SLURM_JOB_ID" not in env:
        return None
    missing = [k for k in ("SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID") if k not in env]
    if missing:
        raise ValueError(f"a SLURM job of {n} tasks without {', '.join(missing)} (run the command with srun, "
                         f"one task per process), from which JAX finds the coordinator and this task's rank")
    return _detected("SLURM", "slurm", n, env)


def _tpu(env) -> Launch | None:
    if not _on_tpu_vm():
        return None
    workers = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
    slices = int(env.get("MEGASCALE_NUM_SLICES", "1") or 1)
    if workers:
        return _detected("a GKE TPU pod", "gketpu", len(workers.split(",")) * slices, env)
    return _detected("a Cloud TPU VM slice", "gcetpu", _gce_tpu_process_count(), env)


def _on_tpu_vm() -> bool:
    """JAX's own finding at import: libtpu is installed and this machine has TPU chips."""
    from jax._src import cloud_tpu_init

    return bool(cloud_tpu_init.running_in_cloud_tpu_vm)


def _gce_tpu_process_count() -> int:
    """The slice's worker count from the TPU VM's metadata, by JAX's ``gcetpu`` detection (1 when it finds no
    slice, e.g. ``TPU_SKIP_MDS_QUERY`` is set)."""
    from jax._src.clusters import GceTpuCluster

    return GceTpuCluster.get_process_count() if GceTpuCluster.is_env_present() else 1


# ---- the persistent compilation cache ------------------------------------------------------------------------

def compilation_cache_dir(run_dir: str, environ=None) -> str | None:
    """Where ``run_dir``'s compiled programs are kept: ``BPO_COMPILATION_CACHE`` when set (``off``: None), else
    ``<run_dir>/compile_cache`` for a local or ``gs://`` run_dir (which every host and every restart sees), else
    None (JAX's cache reads other object stores only through a mounted path)."""
    env = os.environ if environ is None else environ
    choice = env.get("BPO_COMPILATION_CACHE", "")
    if choice == "off":
        return None
    if choice:
        return choice
    run_dir = str(run_dir)
    if "://" in run_dir and not run_dir.startswith("gs://"):
        return None
    return run_dir.rstrip("/") + "/compile_cache" if "://" in run_dir else os.path.join(os.path.abspath(run_dir),
                                                                                       "compile_cache")


def enable_compilation_cache(run_dir: str, environ=None) -> str | None:
    """Turn on JAX's persistent compilation cache in ``compilation_cache_dir(run_dir)`` for every program that
    takes at least ``MIN_COMPILE_SECONDS`` to compile (or JAX's ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS``, when
    set), whatever its size, so CPU-sized programs are cached too.
    Call it before the run's first compile, on every host; returns the folder, or None when the cache stays off.
    Entries are keyed by the program, the devices and the JAX/XLA versions: a stale entry is never used."""
    env = os.environ if environ is None else environ
    directory = compilation_cache_dir(run_dir, env)
    if directory is None:
        return None
    from jax.experimental.compilation_cache import compilation_cache as cc

    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", directory)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in env:  # JAX's own variable, when set, is the user's choice
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # no size threshold, none imposed by JAX
    cc.reset_cache()  # a cache JAX opened before (another folder, or none) is reopened in ``directory``
    log.debug("bpo_jax: compilation cache in %s", directory)
    return directory
