"""Processes: the one module that knows a run may span several hosts (JAX's multi-controller runtime).

Every host runs the same program on its own devices; arrays that span hosts are global ``jax.Array``s over one
mesh. The rest of the package asks this module, and reads no process index of its own:

- Joining the processes at start-up is ``bpo_jax.runtime.cluster``'s job (every launch environment JAX supports).
- ``is_primary()``: process 0, the one that prints, draws progress bars and writes metrics, plots, configs,
  exports.
- ``global_rows(tree, mesh)`` / ``local_rows(tree)``: each host's rows → global arrays sharded over the mesh's
  batch axes, and back. Host p owns the rows on its devices, in the order of the global array.
- ``make_mesh`` / ``check_batch_layout``: the mesh over every host's devices, with each tensor group inside a
  host and, over several slices (``bpo_jax.runtime.slices``), only the data axis across slices; a refusal before
  any compute when hosts would share batch shards or fsdp/tensor would cross slices.
- ``gather_to_primary``: whole weights onto the primary host (an export), in blocks of bounded size.
- ``all_gather``, ``any_host``, ``min_over_hosts``: small host values (counts, flags, widths) that every host
  must agree on before a collective; hosts never compute a shared decision each on their own.
- ``agreed`` / ``raise_on_all``: host-local work that may fail, then one shared outcome: an error on one host
  ends every host with the same message and exit kind (``HostError``, ``bpo_jax.runtime.exits``) instead of
  leaving the others waiting in a collective.
"""

from __future__ import annotations

import functools
import json
import logging
import os

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bpo_jax.runtime import exits
from bpo_jax.runtime import sharding as shd
from bpo_jax.runtime import slices as slices_mod
from bpo_jax.runtime.sharding import BATCH_AXES, batch_shards

log = logging.getLogger(__name__)


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_primary() -> bool:
    return jax.process_index() == 0


def is_remote(path: str) -> bool:
    """A path on shared object storage (``gs://``, ``s3://``, ...) rather than this host's file system."""
    return "://" in str(path)


# ---- which host owns which rows ------------------------------------------------------------------------------

def host_aware_devices(sizes, devices=None, slice_of=None) -> np.ndarray | None:
    """``devices`` arranged as a ``(data, fsdp, tensor)`` array in which every ``tensor`` group lies inside one
    host, so hosts own disjoint batch shards, and with ``slice_of`` (``{process: slice}``, ``bpo_jax.runtime.slices``)
    only ``data`` crosses slices; None when the shape cannot keep it so (``tensor`` does not divide a host's device
    count, the hosts do not split over ``data x fsdp``, or ``data`` is not a multiple of the slice count).

    JAX's hybrid mesh with each process a granule (``mesh_utils.create_hybrid_device_mesh(...,
    process_is_granule=True)``): the hosts, slice by slice, form an outer ``(dd, df)`` grid over the batch axes
    (``dd`` a multiple of the slices, as large as it can be: data parallelism between hosts needs one gradient
    all-reduce where fsdp would gather weights every layer), so each slice's hosts fill whole rows of it; each
    host's own devices fill the inner ``(data/dd, fsdp/df, tensor)`` block (TPU chips in ICI order)."""
    from jax.experimental import mesh_utils

    devices = list(jax.devices() if devices is None else devices)
    slice_of = slice_of or {}
    hosts = sorted({d.process_index for d in devices}, key=lambda h: (slice_of.get(h, 0), h))
    per_host = {h: [d for d in devices if d.process_index == h] for h in hosts}
    slices = len({slice_of.get(h, 0) for h in hosts})
    data, fsdp, tensor = sizes
    local = len(per_host[hosts[0]])
    if any(len(v) != local for v in per_host.values()) or local % tensor or len(hosts) % slices:
        return None
    n = len(hosts)
    for dd in sorted((d for d in range(slices, n + 1, slices) if n % d == 0 and data % d == 0), reverse=True):
        df = n // dd
        if fsdp % df == 0 and (data // dd) * (fsdp // df) * tensor == local:
            break
    else:
        return None
    ordered = [d for h in hosts for d in per_host[h]]  # slice-major: each slice's hosts take consecutive rows
    return mesh_utils.create_hybrid_device_mesh((data // dd, fsdp // df, tensor), (dd, df, 1), ordered,
                                                process_is_granule=True, should_sort_granules_by_key=False,
                                                allow_split_physical_axes=True)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, device_ids=None, slices=slices_mod.MESH_SLICES_AUTO):
    """The run's ``(data, fsdp, tensor)`` mesh over every process's devices, checked before any compute.

    ``slices`` is the setting ``mesh_slices`` (``bpo_jax.runtime.slices``: auto, 1 or N). One process and one
    slice: JAX's own physical device order (``sharding.make_mesh``). Several processes: ``arrange_devices``.
    ``device_ids``: an explicit device order (row-major over data, fsdp, tensor), e.g. to reproduce a slice's
    physical layout; it is checked the same way."""
    sizes = shd.mesh_sizes(data, fsdp, tensor, jax.device_count())
    arranged = arrange_devices(sizes, jax.devices(), slices, device_ids)
    mesh = shd.make_mesh(*sizes) if arranged is None else shd.mesh_from_devices(arranged)
    check_batch_layout(mesh)
    return mesh


def arrange_devices(sizes, devices, slices=slices_mod.MESH_SLICES_AUTO, device_ids=None) -> np.ndarray | None:
    """The ``(data, fsdp, tensor)`` device array of ``make_mesh`` (None: JAX's own order, for one process in one
    slice), a function of the global device list alone, so every host builds the same mesh.

    Several slices (``slices.slice_layout``): ``host_aware_devices`` over the slices, only ``data`` crossing them;
    a shape that cannot keep fsdp and tensor inside the slices is refused (``ValueError``, one line naming a shape
    that works and ``mesh_slices=1``). Several processes in one slice: ``host_aware_devices``, each tensor group
    inside a host; where the shape cannot allow that, JAX's order (``check_batch_layout`` refuses it if hosts
    would share batch shards). An axis other than ``data`` that crosses slices because the user asked for it
    (``mesh_slices=1`` on several slices, or ``device_ids``) is logged as a warning naming the axes."""
    layout = slices_mod.slice_layout(slices_mod.parse_mesh_slices(slices), devices)
    count = slices_mod.slice_count(layout)
    if device_ids:
        by_id = {d.id: d for d in devices}
        if sorted(device_ids) != sorted(by_id):
            raise ValueError(f"mesh_device_ids must name each of the {len(by_id)} devices once (ids "
                             f"{sorted(by_id)}); got {list(device_ids)}")
        arranged = np.asarray([by_id[i] for i in device_ids], dtype=object).reshape(sizes)
    elif count > 1:
        arranged = host_aware_devices(sizes, devices, layout)
        if arranged is None:
            per_host = len(devices) // len(layout)
            raise ValueError(
                f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} cannot keep fsdp and tensor inside "
                f"each of the {count} slices (across slices only data goes over the data-centre network: "
                f"mesh_data a multiple of {count}, mesh_tensor within a host's {per_host} devices); e.g. "
                f"{slices_mod.working_shape(len(devices), per_host, sizes[2], count)}, or mesh_slices=1 to let "
                f"other axes cross slices (slow; warned)")
    elif len(layout) > 1:
        arranged = host_aware_devices(sizes, devices)
    else:
        arranged = None
    if arranged is None:
        return None
    _log_slices(arranged, layout if count > 1 else slices_mod.process_slices(devices), len(layout))
    return arranged


def _log_slices(arranged: np.ndarray, slice_of: dict[int, int], processes: int) -> None:
    """One line on the primary host for a mesh over several slices: a warning when an axis other than ``data``
    crosses them, else where the slices are."""
    count = slices_mod.slice_count(slice_of)
    if count < 2 or not is_primary():
        return
    shape = " x ".join(f"{a}={n}" for a, n in zip(shd.MESH_AXES, arranged.shape))
    crossing = slices_mod.dcn_axes(arranged, shd.MESH_AXES, slice_of)
    slow = [a for a in crossing if a != "data"]
    if slow:
        axes = f"the {slow[0]} axis crosses" if len(slow) == 1 else f"the {' and '.join(slow)} axes cross"
        log.warning("mesh %s: %s the data-centre network between the %d slices, so their collectives run at DCN "
                    "speed at every layer; %s keeps only data across slices", shape, axes, count,
                    slices_mod.working_shape(arranged.size, arranged.size // processes, arranged.shape[2], count))
    else:
        log.info("mesh %s over %d slices of %d hosts: only the data axis crosses slices", shape, count,
                 processes // count)


@functools.lru_cache(maxsize=16)
def host_batch_shards(mesh) -> dict[int, list[int]]:
    """``{process: sorted batch-shard indices}`` of every host on ``mesh``: the batch axes' flat index
    (``data * fsdp_size + fsdp``) of each of its devices. Computed from the mesh alone (the same on every host)."""
    out: dict[int, set] = {}
    names = list(mesh.axis_names)
    sizes = [mesh.shape[a] for a in BATCH_AXES]
    for idx, dev in np.ndenumerate(mesh.devices):
        d, f = (idx[names.index(a)] for a in BATCH_AXES)
        out.setdefault(dev.process_index, set()).add(d * sizes[1] + f)
    return {p: sorted(v) for p, v in sorted(out.items())}


def check_batch_layout(mesh) -> None:
    """Raise ``ValueError`` (one line) unless the hosts own disjoint, equally many batch shards on ``mesh``.

    Two hosts holding the same batch shard would each write their own rows into it: JAX would build a smaller
    batch from whichever copy it reads, and sampling, rewards and gradients would be garbage with no error."""
    if mesh is None:
        return
    owned = host_batch_shards(mesh)
    if len(owned) < 2:
        return
    seen: dict[int, int] = {}
    for p, shards in owned.items():
        for s in shards:
            if s in seen:
                raise ValueError(
                    f"mesh {dict(mesh.shape)} puts batch shard {s} on hosts {seen[s]} and {p}: a mesh axis other "
                    f"than {' x '.join(BATCH_AXES)} spans hosts, so two hosts would feed the same rows. "
                    f"{_working_shape(mesh)}")
            seen[s] = p
    if len({len(v) for v in owned.values()}) > 1:
        raise ValueError(f"mesh {dict(mesh.shape)} gives the hosts unequal numbers of batch shards "
                         f"({ {p: len(v) for p, v in owned.items()} }); {_working_shape(mesh)}")


def _working_shape(mesh) -> str:
    devices = list(mesh.devices.flat)
    local = len([d for d in devices if d.process_index == devices[0].process_index])
    count = slices_mod.slice_count(slices_mod.process_slices(devices))
    return (f"Keep mesh_tensor within one host's {local} devices and leave the device order to bpo_jax, e.g. "
            f"{slices_mod.working_shape(len(devices), local, mesh.shape['tensor'], count)}")


def local_batch_shards(mesh) -> int:
    """How many of the batch shards this host holds (all of them without a mesh or with one process)."""
    if mesh is None:
        return 1
    if jax.process_count() == 1:
        return batch_shards(mesh)
    return len(host_batch_shards(mesh)[jax.process_index()])


def host_batch_rows(mesh, rows: int) -> np.ndarray:
    """The positions, in a global batch of ``rows`` rows over ``mesh``'s batch axes, that this host owns (shard
    ``s`` holds rows ``[s * rows / S, (s + 1) * rows / S)``), in global order."""
    if mesh is None or jax.process_count() == 1:
        return np.arange(rows)
    shards = batch_shards(mesh)
    if rows % shards:
        raise ValueError(f"a global batch of {rows} rows does not split over {shards} batch shards")
    per = rows // shards
    return np.concatenate([np.arange(s * per, (s + 1) * per) for s in host_batch_shards(mesh)[jax.process_index()]])


# ---- host rows <-> global arrays -----------------------------------------------------------------------------

def global_rows(tree, mesh):
    """This host's rows (NumPy, leading row axis) → global arrays with rows sharded over the batch axes.

    One process: the rows are the whole batch (rows that do not divide the batch shards stay replicated).
    Several: host p's rows become the rows of host p's batch shards (``host_batch_rows``), in global order, so
    every host must pass the same row count, a multiple of its batch shards. The global shape is stated, never
    inferred: a layout where hosts share shards fails here instead of building a smaller batch.
    """
    if mesh is None:
        return jax.tree.map(jax.numpy.asarray, tree)

    def one(x):
        x = np.asarray(x)
        if jax.process_count() == 1:
            spec = P() if x.shape[0] % batch_shards(mesh) else P(BATCH_AXES)
            return jax.device_put(x, NamedSharding(mesh, spec))
        mine = local_batch_shards(mesh)
        if x.shape[0] % mine:
            raise ValueError(f"{x.shape[0]} rows on this host do not split over its {mine} batch shards")
        shape = (x.shape[0] // mine * batch_shards(mesh), *x.shape[1:])
        return jax.make_array_from_process_local_data(NamedSharding(mesh, P(BATCH_AXES)), x, shape)

    check_batch_layout(mesh)
    return jax.tree.map(one, tree)


def local_rows(tree, mesh=None):
    """Global arrays → this host's rows as NumPy (the inverse of ``global_rows``).

    One process: everything. Several: the rows of this host's batch shards (``host_batch_rows``), also when an
    output came back replicated or split over only some of the batch axes (XLA may leave a small output split over
    ``data`` alone: the host then holds its data block's rows, its own among them); an array whose addressable
    rows miss some of this host's rows is refused."""
    def one(x):
        if not isinstance(x, jax.Array) or jax.process_count() == 1 or x.is_fully_addressable:
            return np.asarray(x)
        if mesh is None:
            raise ValueError("local_rows of a multi-host array needs the mesh its rows are sharded over")
        want = host_batch_rows(mesh, x.shape[0])
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))[want]
        blocks = {}
        for shard in x.addressable_shards:
            rows = shard.index[0] if shard.index else slice(None)
            blocks.setdefault(rows.start or 0, np.asarray(shard.data))
        got = np.concatenate([np.arange(k, k + len(blocks[k])) for k in sorted(blocks)])  # ascending
        if not np.isin(want, got).all():
            raise ValueError(f"an output of shape {x.shape} is not row-sharded over this host's batch shards "
                             f"({x.sharding}); pin its sharding to the batch axes")
        return np.concatenate([blocks[k] for k in sorted(blocks)], axis=0)[np.searchsorted(got, want)]

    return jax.tree.map(one, tree)


def gather_to_host(tree):
    """Every array of ``tree`` in full on every host, as NumPy (a collective: all hosts call it). Each array is
    replicated on every device on the way: for small trees (LoRA factors); weights go ``gather_to_primary``."""
    if jax.process_count() == 1:
        return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


GATHER_BYTES = 64 << 20  # what one step of ``gather_to_primary`` may put on each device


def gather_to_primary(tree, max_bytes: int | None = None):
    """Every array of ``tree`` in full as NumPy on the primary host, None on the others (a collective: all hosts
    call it), holding at most one block of an array at once on each device and in each other host's memory.

    An array this host holds entirely (one process, or replicated) is assembled from its device shards in host
    memory, with no device copy. One split over hosts travels in row blocks along its first axis (a stacked
    weight's layers): each block is replicated on every device and every host for one collective, then only the
    primary keeps it. A block is the most rows that fit ``max_bytes`` (``GATHER_BYTES`` by default), at least
    one row (one layer); the last block may be shorter (two compiled slices per shape at most)."""
    from jax.experimental import multihost_utils

    max_bytes = GATHER_BYTES if max_bytes is None else max_bytes

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(x) if is_primary() else None
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0)) if is_primary() else None
        n = x.shape[0]
        rows = min(n, max(1, max_bytes // max(1, x.dtype.itemsize * int(np.prod(x.shape[1:])))))
        out = np.empty(x.shape, x.dtype) if is_primary() else None
        for start in range(0, n, rows):
            block = multihost_utils.process_allgather(_row_block(x, start, min(rows, n - start)), tiled=True)
            if out is not None:
                out[start:start + len(block)] = block
        return out

    return jax.tree.map(one, tree)


@functools.partial(jax.jit, static_argnums=2)
def _row_block(x, start, rows: int):
    return jax.lax.dynamic_slice_in_dim(x, start, rows, axis=0)


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


JSON_MIN_WIDTH = 256  # bytes: the narrowest ``gather_json`` payload (small outcomes and listings fit)


def json_width(size: int) -> int:
    """The padded width of a ``gather_json`` payload of ``size`` bytes: the next power of two, at least
    ``JSON_MIN_WIDTH``. Each width is one compiled collective, so a run compiles a handful of them (one per
    power of two its payloads reach) instead of one per distinct payload size."""
    return max(JSON_MIN_WIDTH, 1 << max(0, size - 1).bit_length())


def gather_json(value) -> list:
    """Every host's JSON-able ``value``, in process order, on every host (e.g. each host's data-stream state).
    Two collectives: the largest payload size, then the payloads padded to ``json_width`` of it."""
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    width = json_width(max_over_hosts(data.size))
    padded = np.zeros((width,), np.uint8)
    padded[: data.size] = data
    rows = all_gather(padded)
    return [json.loads(bytes(r).rstrip(b"\0").decode()) for r in rows]


class HostError(Exception):
    """An error one host met, raised on every host with the same message and the same exit kind: ``exit_code``,
    the failing host's (``bpo_jax.runtime.exits``), so every host exits as that host would have alone."""

    def __init__(self, message: str, exit_code: int = exits.TRANSIENT):
        super().__init__(message)
        self.exit_code = exit_code


def raise_on_all(problem: BaseException | None) -> None:
    """A collective: every host passes the error it met (or None); when any host met one, every host raises
    ``HostError`` with the first failing host's message (its first line) and exit kind, so all exit with the
    same line and code instead of some waiting in the next collective. One process: ``problem`` itself is raised
    unchanged."""
    if jax.process_count() == 1:
        if problem is not None:
            raise problem
        return
    mine = None if problem is None else [exits.exit_code(problem), exits.describe(problem).splitlines()[0]]
    failed = [(i, m) for i, m in enumerate(gather_json(mine)) if m is not None]
    if failed:
        i, (code, message) = failed[0]
        raise HostError(f"process {i}: {message}", code) from problem


def agreed(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` for host-local work that may fail (reading files, a prompt probe, an API judge),
    followed by one shared decision: it returns on every host or raises on every host (``raise_on_all``).
    ``fn`` must not itself enter a collective that another host could skip."""
    try:
        result, problem = fn(*args, **kwargs), None
    except Exception as err:  # noqa: BLE001  any error: the other hosts must hear of it
        result, problem = None, err
    raise_on_all(problem)
    return result


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
