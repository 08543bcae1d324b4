"""Processes: the one module that knows a run may span several hosts (JAX's multi-controller runtime).

Every host runs the same program on its own devices; arrays that span hosts are global ``jax.Array``s over one
mesh. The rest of the package asks this module, and reads no process index of its own:

- ``initialize()``: called first by every CLI command. A Cloud TPU VM slice is detected by JAX itself; a GPU
  cluster takes its coordinator, process count and id from SLURM, or from ``BPO_COORDINATOR_ADDRESS``,
  ``BPO_NUM_PROCESSES``, ``BPO_PROCESS_ID`` (and optionally ``BPO_LOCAL_DEVICE_IDS``). One process does nothing.
- ``is_primary()``: process 0, the one that prints, draws progress bars and writes metrics, plots, configs,
  exports.
- ``global_rows(tree, mesh)`` / ``local_rows(tree)``: each host's rows → global arrays sharded over the mesh's
  batch axes, and back. Host p owns the rows on its devices, in the order of the global array.
- ``all_gather``, ``any_host``, ``min_over_hosts``: small host values (counts, flags, widths) that every host
  must agree on before a collective; hosts never compute a shared decision each on their own.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bpo_jax.sharding import BATCH_AXES, batch_shards

ENV_VARS = ("BPO_COORDINATOR_ADDRESS", "BPO_NUM_PROCESSES", "BPO_PROCESS_ID", "BPO_LOCAL_DEVICE_IDS")


def _tpu_vm() -> bool:
    """A Cloud TPU VM (libtpu installed and TPU chips present); JAX's own detection finds its slice."""
    import glob
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None and bool(glob.glob("/dev/accel*") or
                                                                    glob.glob("/dev/vfio/[0-9]*"))


def initialize(environ=None) -> None:
    """Join the run's processes (``jax.distributed.initialize``) before anything touches a device; a no-op
    for a single process, when already initialised, or with ``BPO_DISTRIBUTED=off``."""
    env = os.environ if environ is None else environ
    if env.get("BPO_DISTRIBUTED", "auto") == "off" or jax.distributed.is_initialized():
        return
    if "BPO_NUM_PROCESSES" in env:
        missing = [k for k in ENV_VARS[:3] if not env.get(k)]
        if missing:
            raise ValueError(f"BPO_NUM_PROCESSES is set but {', '.join(missing)} is not; set all three "
                             f"(or none, on a TPU slice or under SLURM)")
        n, i = int(env["BPO_NUM_PROCESSES"]), int(env["BPO_PROCESS_ID"])
        if not 0 <= i < n:
            raise ValueError(f"BPO_PROCESS_ID={i} must be in [0, BPO_NUM_PROCESSES={n})")
        if n == 1:
            return
        ids = env.get("BPO_LOCAL_DEVICE_IDS")
        jax.distributed.initialize(env["BPO_COORDINATOR_ADDRESS"], num_processes=n, process_id=i,
                                   local_device_ids=[int(x) for x in ids.split(",")] if ids else None)
    elif int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env:
        jax.distributed.initialize(cluster_detection_method="slurm")
    elif _tpu_vm():
        jax.distributed.initialize()


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_primary() -> bool:
    return jax.process_index() == 0


def is_remote(path: str) -> bool:
    """A path on shared object storage (``gs://``, ``s3://``, ...) rather than this host's file system."""
    return "://" in str(path)


# ---- host rows <-> global arrays -----------------------------------------------------------------------------

def local_batch_shards(mesh) -> int:
    """How many of the batch shards this host holds."""
    return max(1, batch_shards(mesh) // jax.process_count())


def global_rows(tree, mesh):
    """This host's rows (NumPy, leading row axis) → global arrays with rows sharded over the batch axes.

    One process: the rows are the whole batch (rows that do not divide the batch shards stay replicated).
    Several: host p's rows become the rows on host p's devices, so every host must pass the same row count,
    a multiple of its batch shards.
    """
    if mesh is None:
        return jax.tree.map(jax.numpy.asarray, tree)

    def one(x):
        x = np.asarray(x)
        if jax.process_count() == 1:
            spec = P() if x.shape[0] % batch_shards(mesh) else P(BATCH_AXES)
            return jax.device_put(x, NamedSharding(mesh, spec))
        if x.shape[0] % local_batch_shards(mesh):
            raise ValueError(f"{x.shape[0]} rows on this host do not split over its {local_batch_shards(mesh)} "
                             f"batch shards")
        return jax.make_array_from_process_local_data(NamedSharding(mesh, P(BATCH_AXES)), x)

    return jax.tree.map(one, tree)


def local_rows(tree):
    """Global arrays → this host's rows as NumPy (the inverse of ``global_rows``; everything on one host)."""
    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(x)
        blocks = {}
        for shard in x.addressable_shards:
            rows = shard.index[0] if shard.index else slice(None)
            blocks.setdefault(rows.start or 0, np.asarray(shard.data))
        return np.concatenate([blocks[k] for k in sorted(blocks)], axis=0)

    return jax.tree.map(one, tree)


def gather_to_host(tree):
    """Every array of ``tree`` in full on every host, as NumPy (a collective: all hosts call it)."""
    if jax.process_count() == 1:
        return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


# ---- decisions every host shares -----------------------------------------------------------------------------

def all_gather(value) -> np.ndarray:
    """``[process_count, ...]``: every host's ``value`` (a number or small array), on every host."""
    value = np.asarray(value)
    if jax.process_count() == 1:
        return value[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(value, tiled=False))


def any_host(flag: bool) -> bool:
    """True on every host when ``flag`` is true on any (e.g. SIGTERM seen by one host: all save)."""
    return bool(all_gather(np.int32(bool(flag))).max())


def min_over_hosts(value: int) -> int:
    return int(all_gather(np.int64(value)).min())


def max_over_hosts(value: int) -> int:
    return int(all_gather(np.int64(value)).max())


def gather_json(value) -> list:
    """Every host's JSON-able ``value``, in process order, on every host (e.g. each host's data-stream state)."""
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    width = max_over_hosts(data.size)
    padded = np.zeros((width,), np.uint8)
    padded[: data.size] = data
    rows = all_gather(padded)
    return [json.loads(bytes(r).rstrip(b"\0").decode()) for r in rows]


def barrier(name: str) -> None:
    """Wait until every host reaches this point (no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def check_shared_dir(directory: str) -> None:
    """Raise unless every host sees the same ``directory`` (a gs:// bucket, a shared file system, or one
    machine's disk for processes on one machine): the primary writes a marker, every host looks for it."""
    if jax.process_count() == 1:
        return
    from etils import epath

    token = gather_json(os.urandom(8).hex())[0]
    marker = epath.Path(directory) / f".bpo_jax_shared_{token}"
    if is_primary():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(token)
    barrier("bpo_jax.shared_dir.written")
    sees = marker.exists() and marker.read_text() == token
    blind = [i for i, ok in enumerate(all_gather(np.int32(sees))) if not ok]
    barrier("bpo_jax.shared_dir.read")
    if is_primary():
        marker.unlink()
    if blind:
        raise ValueError(f"run_dir={directory!r} is not shared storage: processes {blind} do not see what process "
                         f"0 writes there. With several hosts use a gs:// bucket or a shared file system")
