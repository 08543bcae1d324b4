"""Process start-up (``bpo_jax.runtime.cluster``): which launch environment a process is in, decided from fake
environments with ``jax.distributed.initialize`` recorded instead of called; the names handed to JAX's own
cluster detection resolve, in JAX, to the right process count and index; ``experiment`` never joins in its own
process; the compilation cache's folder. Then a real group: two processes launched with JAX's own variables
join (each logs ``process i of 2``) and run ``generate``.
"""

import logging
import os

import jax
import pytest
from jax._src import distributed as jax_distributed

from bpo_jax.runtime import cluster
from multihost import run_group
from testing import ROOT

TIMEOUTS = dict(heartbeat_timeout_seconds=cluster.HEARTBEAT_TIMEOUT, shutdown_timeout_seconds=cluster.SHUTDOWN_TIMEOUT,
                initialization_timeout=cluster.INITIALIZATION_TIMEOUT)
SLURM = dict(SLURM_JOB_ID="4097", SLURM_STEP_NODELIST="node[003-004]", SLURM_NTASKS="2", SLURM_PROCID="1",
             SLURM_LOCALID="0")
OMPI = dict(OMPI_MCA_orte_hnp_uri="1531576320.0;tcp://10.96.0.1,10.148.0.1:34911", OMPI_COMM_WORLD_SIZE="4",
            OMPI_COMM_WORLD_RANK="3", OMPI_COMM_WORLD_LOCAL_RANK="1")


@pytest.fixture
def calls(monkeypatch):
    """``jax.distributed.initialize``'s keyword arguments, one dict per call; nothing joins, and the process
    count and index it would have found are those the call names (0 of 1 when JAX's detection would)."""
    recorded = []

    def fake(**kwargs):
        recorded.append(kwargs)
        jax_distributed.global_state.num_processes = kwargs.get("num_processes") or 1
        jax_distributed.global_state.process_id = kwargs.get("process_id") or 0

    monkeypatch.setattr(jax.distributed, "initialize", fake)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax_distributed.global_state, "num_processes", 1)
    monkeypatch.setattr(jax_distributed.global_state, "process_id", 0)
    monkeypatch.setattr(cluster, "_on_tpu_vm", lambda: False)
    return recorded


def test_bpo_variables_are_passed_as_they_are(calls, caplog):
    env = dict(BPO_COORDINATOR_ADDRESS="10.0.0.1:1234", BPO_NUM_PROCESSES="2", BPO_PROCESS_ID="1",
               BPO_LOCAL_DEVICE_IDS="0,1")
    with caplog.at_level(logging.INFO, logger="bpo_jax"):
        assert cluster.initialize(env).name == "bpo_jax's BPO_* variables"
    assert calls == [dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1,
                          local_device_ids=[0, 1], cluster_detection_method="deactivate", **TIMEOUTS)]
    assert "joined bpo_jax's BPO_* variables: process 1 of 2 processes" in caplog.text


def test_bpo_variables_under_slurm_keep_every_local_gpu():
    """launch/slurm.sh runs one process per node with the BPO_* variables inside a Slurm job: JAX's own SLURM
    detection must not restrict the process to the GPU of its SLURM_LOCALID (JAX sets
    ``jax_cuda_visible_devices`` from ``local_device_ids``; on the CPU the setting is recorded all the same)."""
    import subprocess
    import sys

    from multihost import child_env, free_port

    code = ("import jax; from bpo_jax.runtime import cluster; import os; "
            "launch = cluster._bpo_vars(os.environ); "
            "jax.distributed.initialize(**launch.kwargs, initialization_timeout=60); "
            "from jax._src import xla_bridge; print('visible', xla_bridge.CUDA_VISIBLE_DEVICES.value); "
            "jax.distributed.shutdown()")
    env = child_env(1, BPO_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}", BPO_NUM_PROCESSES="1",
                    BPO_PROCESS_ID="0", SLURM_JOB_ID="77", SLURM_NTASKS="1", SLURM_PROCID="0", SLURM_LOCALID="3",
                    SLURM_STEP_NODELIST="localhost")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "visible all" in out.stdout, out.stdout


def test_jax_variables(calls):
    env = dict(JAX_COORDINATOR_ADDRESS="10.0.0.1:1234", JAX_NUM_PROCESSES="4", JAX_PROCESS_ID="3")
    cluster.initialize(env)
    assert calls == [dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3, **TIMEOUTS)]


@pytest.mark.parametrize("env, message", [
    (dict(BPO_NUM_PROCESSES="2"), "BPO_NUM_PROCESSES is set but BPO_COORDINATOR_ADDRESS, BPO_PROCESS_ID is not"),
    (dict(BPO_PROCESS_ID="0", BPO_COORDINATOR_ADDRESS="h:1"), "BPO_COORDINATOR_ADDRESS is set but BPO_NUM_PROCESSES"),
    (dict(BPO_COORDINATOR_ADDRESS="h:1", BPO_NUM_PROCESSES="2", BPO_PROCESS_ID="2"),
     r"BPO_PROCESS_ID=2 must be in \[0, BPO_NUM_PROCESSES=2\)"),
    (dict(JAX_NUM_PROCESSES="2"), "JAX_NUM_PROCESSES is set but JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID are not"),
    (dict(JAX_COORDINATOR_ADDRESS="h:1", JAX_NUM_PROCESSES="2"),
     "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES are set but JAX_PROCESS_ID is not"),
    (dict(JAX_COORDINATOR_ADDRESS="h:1"), "JAX_COORDINATOR_ADDRESS is set but JAX_NUM_PROCESSES, JAX_PROCESS_ID"),
    (dict(JAX_COORDINATOR_ADDRESS="h:1", JAX_NUM_PROCESSES="two", JAX_PROCESS_ID="0"), "must be whole numbers"),
    ({k: v for k, v in OMPI.items() if k != "OMPI_MCA_orte_hnp_uri"}, "without OMPI_MCA_orte_hnp_uri"),
    ({k: v for k, v in SLURM.items() if k != "SLURM_PROCID"}, "SLURM job of 2 tasks without SLURM_PROCID"),
    (dict(BPO_DISTRIBUTED="no"), "BPO_DISTRIBUTED='no': use auto"),
    (dict(BPO_HEARTBEAT_TIMEOUT="0", **SLURM), "BPO_HEARTBEAT_TIMEOUT='0' must be a positive whole number"),
])
def test_half_set_environments_name_what_is_missing(calls, env, message):
    with pytest.raises(ValueError, match=message):
        cluster.initialize(env)
    assert calls == []


def test_open_mpi_and_slurm_use_jax_detection(calls):
    cluster.initialize(OMPI)
    cluster.initialize(SLURM)
    cluster.initialize(dict(SLURM, JAX_COORDINATOR_ADDRESS="node003:5555"))  # overrides the detected coordinator
    assert calls == [dict(coordinator_address=None, cluster_detection_method="ompi", **TIMEOUTS),
                     dict(coordinator_address=None, cluster_detection_method="slurm", **TIMEOUTS),
                     dict(coordinator_address="node003:5555", cluster_detection_method="slurm", **TIMEOUTS)]
    # Open MPI 5 (no URI): the coordinator from JAX_COORDINATOR_ADDRESS, count and rank from Open MPI.
    cluster.initialize(dict({k: v for k, v in OMPI.items() if k != "OMPI_MCA_orte_hnp_uri"},
                            JAX_COORDINATOR_ADDRESS="10.0.0.1:1234"))
    assert calls[-1] == dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3, **TIMEOUTS)


def test_tpu_pods_use_jax_detection(calls, monkeypatch):
    cluster.initialize(dict(TPU_WORKER_HOSTNAMES="w0,w1"))  # not a TPU VM: nothing
    monkeypatch.setattr(cluster, "_on_tpu_vm", lambda: True)
    cluster.initialize(dict(TPU_WORKER_HOSTNAMES="w0,w1,w2,w3", TPU_WORKER_ID="2"))
    cluster.initialize(dict(TPU_PROCESS_ADDRESSES="w0:8471", MEGASCALE_NUM_SLICES="2"))
    cluster.initialize(dict(TPU_WORKER_HOSTNAMES="w0"))  # a single-host GKE node: nothing
    monkeypatch.setattr(cluster, "_gce_tpu_process_count", lambda: 4)
    assert cluster.detect({}).name == "a Cloud TPU VM slice" and cluster.detect({}).num_processes == 4
    cluster.initialize({})
    monkeypatch.setattr(cluster, "_gce_tpu_process_count", lambda: 1)  # a single-host TPU VM (v5e-8): nothing
    cluster.initialize({})
    assert calls == [dict(coordinator_address=None, cluster_detection_method=m, **TIMEOUTS)
                     for m in ("gketpu", "gketpu", "gcetpu")]


def test_jax_resolves_the_detection_methods_named(monkeypatch):
    """The names ``cluster`` hands to JAX select JAX's Open MPI / SLURM / GKE detection, which finds the count,
    index and coordinator from the same variables ``cluster.detect`` looked at."""
    from jax._src.clusters import ClusterEnv, cloud_tpu_cluster

    def resolve(env, method):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        found = ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None, method, 1)
        for k in env:
            monkeypatch.delenv(k)
        return found

    address, n, i, _ = resolve(OMPI, "ompi")
    assert address.startswith("10.96.0.1:") and (n, i) == (4, 3)
    address, n, i, local = resolve(SLURM, "slurm")
    assert address.startswith("node003:") and (n, i, local) == (2, 1, [0])
    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
    gke = dict(TPU_WORKER_HOSTNAMES="127.0.0.1,localhost", TPU_WORKER_ID="1", MEGASCALE_NUM_SLICES="1",
               MEGASCALE_SLICE_ID="0", MEGASCALE_COORDINATOR_ADDRESS="")  # as GKE sets them: no metadata query
    assert resolve(gke, "gketpu")[:3] == ("127.0.0.1:8482", 2, 1)
    assert cluster.detect(gke) is None  # (this machine is no TPU VM)


def test_slurm_coordinator_port_is_jaxs(monkeypatch):
    """Process 0's coordinator port under SLURM, computed from the environment it is given, is the one JAX's
    SLURM detection serves on (from ``os.environ``); other processes, and a TPU slice, get None."""
    from jax._src.clusters import SlurmCluster

    for extra in (dict(SLURM_JOB_ID="4097"), dict(SLURM_JOB_ID="123456"), dict(JAX_COORDINATOR_PORT="5123")):
        env = dict(SLURM, SLURM_PROCID="0", **extra)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        jax_port = int(SlurmCluster.get_coordinator_address(None, env.get("JAX_COORDINATOR_PORT")).rsplit(":", 1)[1])
        assert cluster.coordinator_port(cluster.detect(env), env) == jax_port, extra
    assert cluster.coordinator_port(cluster.detect(SLURM), SLURM) is None  # SLURM_PROCID=1
    tpu = cluster.Launch("a GKE TPU pod", 4, None, dict(coordinator_address=None, cluster_detection_method="gketpu"))
    assert cluster.coordinator_port(tpu, {}) is None


def test_process_0_refuses_a_coordinator_port_in_use(calls):
    """A coordination service already on the port (another job's: JAX's own, which binds with SO_REUSEPORT, so a
    second one would start beside it and the jobs would abort each other) makes process 0 fail before it joins,
    naming the port; another process does not check (the port is process 0's, on another host)."""
    from jax._src.lib import _jax

    from multihost import free_port

    port = free_port()
    other_job = _jax.get_distributed_runtime_service(f"[::]:{port}", 2)
    env = dict(BPO_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", BPO_NUM_PROCESSES="2", BPO_PROCESS_ID="0")
    with pytest.raises(ValueError, match=f"the coordinator's port {port} is already in use on this host"):
        cluster.initialize(env)
    with pytest.raises(ValueError, match=f"port {port} is already in use"):
        cluster.initialize(dict(SLURM, SLURM_PROCID="0", JAX_COORDINATOR_PORT=str(port)))
    assert calls == []
    cluster.initialize(dict(env, BPO_PROCESS_ID="1"))
    other_job.shutdown()
    cluster.initialize(env)  # the port is free again
    assert [c["process_id"] for c in calls] == [1, 0]


def test_a_reserved_port_is_kept_for_the_coordinator_alone():
    """The test harness's ``reserved_port``: no other socket can bind the port, JAX's coordination service can,
    and until it does nothing listens there (so process 0's check passes)."""
    import errno
    import socket

    from jax._src.lib import _jax

    from multihost import reserved_port

    with reserved_port() as port:
        cluster.refuse_busy_port(port)
        with socket.socket() as other, pytest.raises(OSError) as err:
            other.bind(("127.0.0.1", port))
        assert err.value.errno == errno.EADDRINUSE
        service = _jax.get_distributed_runtime_service(f"[::]:{port}", 2)
        with pytest.raises(ValueError, match="already in use"):
            cluster.refuse_busy_port(port)
        service.shutdown()


def test_single_process_off_and_already_initialised_do_nothing(calls, monkeypatch):
    assert cluster.initialize({}) is None
    assert cluster.initialize(dict(BPO_COORDINATOR_ADDRESS="h:1", BPO_NUM_PROCESSES="1", BPO_PROCESS_ID="0")) is None
    assert cluster.initialize(dict(SLURM, SLURM_NTASKS="1")) is None
    assert cluster.initialize(dict(OMPI, OMPI_COMM_WORLD_SIZE="1")) is None
    assert cluster.initialize(dict(SLURM, BPO_DISTRIBUTED="off")) is None
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    assert cluster.initialize(SLURM) is None
    assert calls == []


def test_timeouts_from_the_environment(calls):
    cluster.initialize(dict(SLURM, BPO_HEARTBEAT_TIMEOUT="12", BPO_SHUTDOWN_TIMEOUT="90",
                            BPO_INITIALIZATION_TIMEOUT="600"))
    assert calls == [dict(coordinator_address=None, cluster_detection_method="slurm", heartbeat_timeout_seconds=12,
                          shutdown_timeout_seconds=90, initialization_timeout=600)]
    assert cluster.HEARTBEAT_TIMEOUT < cluster.DEAD_PEER_BOUND <= 120


def test_only_device_commands_join_and_experiment_never_in_its_process(monkeypatch, tmp_path, capsys):
    from bpo_jax import __main__ as cli

    joined = []
    monkeypatch.setattr(cluster, "initialize", lambda environ=None: joined.append(True))
    for key, value in SLURM.items():  # a multi-process environment: a joining command would join
        monkeypatch.setenv(key, value)
    tiny = os.path.join(ROOT, "configs", "experiments", "tiny.yaml")
    assert cli.main(["experiment", tiny, "--dry-run", "--out-dir", str(tmp_path)]) == 0
    assert "python -m bpo_jax train" in capsys.readouterr().out and joined == []
    with pytest.raises(SystemExit):  # experiment --in-process runs train in its own process: it never joins
        cli.main(["train", "--help"], join=False)
    assert joined == []
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert joined == [True] and set(cli.JOINING) == {"train", "sft", "evaluate", "compare", "generate"}


def test_a_start_up_error_is_one_line(monkeypatch, capsys):
    from bpo_jax import __main__ as cli

    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    assert cli.main(["generate", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: JAX_NUM_PROCESSES is set but JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID are not")


def test_compilation_cache_folder(tmp_path):
    local = str(tmp_path / "run")
    assert cluster.compilation_cache_dir(local, {}) == os.path.join(local, "compile_cache")
    assert cluster.compilation_cache_dir("gs://bucket/run/", {}) == "gs://bucket/run/compile_cache"
    assert cluster.compilation_cache_dir("s3://bucket/run", {}) is None
    assert cluster.compilation_cache_dir(local, dict(BPO_COMPILATION_CACHE="/cache")) == "/cache"
    assert cluster.compilation_cache_dir(local, dict(BPO_COMPILATION_CACHE="off")) is None
    assert cluster.enable_compilation_cache(local, dict(BPO_COMPILATION_CACHE="off")) is None


def test_enable_compilation_cache_writes_compiled_programs(tmp_path, monkeypatch):
    """A program compiled with the cache on is written to the folder (here whatever its compile time)."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    keys = ("jax_enable_compilation_cache", "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    before = {k: getattr(jax.config, k) for k in keys}
    monkeypatch.setattr(cluster, "MIN_COMPILE_SECONDS", 0.0)
    try:
        folder = cluster.enable_compilation_cache(str(tmp_path / "run"), {})
        jax.jit(lambda x: x * 3.0 + 1.0)(jax.numpy.arange(7.0)).block_until_ready()
        assert folder == str(tmp_path / "run" / "compile_cache") and os.listdir(folder)
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
        # JAX's own variable, when the environment sets it, is left to JAX (which read it at import).
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 7.0)
        cluster.enable_compilation_cache(str(tmp_path / "run"), {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "7"})
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 7.0
    finally:
        for k, v in before.items():
            jax.config.update(k, v)
        cc.reset_cache()


@pytest.mark.slow
def test_two_processes_join_with_jax_variables(tiny_policy_and_rm):
    """A real group launched the way JAX documents it (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID, no BPO_* variable): both processes join one group of 2 and answer; only the primary prints."""
    policy, _ = tiny_policy_and_rm

    def jax_vars(n, i, port):
        return dict(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(i))

    args = ["generate", "--model", policy, "--prompt", "Hello", "--max-new-tokens", "3"]
    results = run_group([args, args], devices=2, launch_vars=jax_vars, allowed=(0,))
    for i, (rc, out, _) in enumerate(results):
        assert rc == 0, out[-2000:]
        assert f"joined JAX's JAX_* variables: process {i} of 2 processes" in out, out[-2000:]
    assert "BPO_" not in results[0].output
