"""Device mesh and logical-axis sharding rules.

Every parameter carries logical axis names (``bpo_jax.models.decoder.param_axes``); rules map them onto the
mesh axes ``data`` / ``fsdp`` / ``tensor``. A mesh axis that does not divide a dimension is skipped for that
dimension (it stays replicated there), so the same rules serve a 1-device CPU, 8 fake CPU devices, one GPU and
a TPU pod slice. Batches are sharded over ``data`` and ``fsdp`` together (``bpo_jax.runtime.distributed.global_rows``
builds them from each host's rows).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis name -> mesh axis (or None: replicated). Override with a list of (name, axis) pairs.
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("lora_rank", None),
    ("ensemble", None),
)


def mesh_sizes(data: int, fsdp: int, tensor: int, device_count: int) -> tuple[int, int, int]:
    """``(data, fsdp, tensor)`` with a -1 resolved to "all remaining devices"; raises when they do not fit."""
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data}, fsdp={fsdp}, tensor={tensor}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if device_count % known:
            raise ValueError(f"{device_count} devices cannot be split into a mesh with fixed axes of size {known}")
        sizes[sizes.index(-1)] = device_count // known
    if int(np.prod(sizes)) != device_count:
        raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs "
                         f"{int(np.prod(sizes))} devices, but {device_count} are available; set mesh_data, "
                         f"mesh_fsdp and mesh_tensor to fit (one may be -1: the remaining devices)")
    return tuple(sizes)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None):
    """A ``(data, fsdp, tensor)`` mesh with Auto axis types in JAX's device order (physical on a TPU); one size
    may be -1 for "all remaining devices". Runs over several hosts build theirs with
    ``bpo_jax.runtime.distributed.make_mesh``, which keeps each tensor group inside a host."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_sizes(data, fsdp, tensor, len(devices))
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def mesh_from_devices(devices: np.ndarray):
    """A mesh over a ``(data, fsdp, tensor)`` device array taken exactly as given (no reordering)."""
    return jax.sharding.Mesh(devices, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def spec_for(axes: Sequence[str | None], shape: Sequence[int], mesh, rules: Iterable | None = None) -> P:
    """The ``PartitionSpec`` for one array: each logical name mapped by ``rules`` (default ``DEFAULT_RULES``;
    later pairs override earlier ones), skipping mesh axes that are already used by an earlier dimension or that
    do not divide the dimension."""
    table = dict(DEFAULT_RULES if rules is None else rules)
    used, out = set(), []
    for name, dim in zip(axes, shape):
        axis = table.get(name) if name is not None else None
        if axis is None or axis in used or dim % mesh.shape[axis]:
            out.append(None)
        else:
            out.append(axis)
            used.add(axis)
    return P(*out)


def logical_to_specs(axes_tree, shapes_tree, mesh, rules: Iterable | None = None):
    """``PartitionSpec`` pytree for params given their logical axes (``param_axes``) and shapes (a pytree of shape
    tuples or of arrays, e.g. the params themselves)."""
    rules = tuple(DEFAULT_RULES if rules is None else rules)
    is_axes = lambda x: isinstance(x, tuple)  # noqa: E731
    return jax.tree.map(lambda ax, s: spec_for(ax, getattr(s, "shape", s), mesh, rules), axes_tree, shapes_tree,
                        is_leaf=is_axes)


def logical_to_sharding(axes_tree, shapes_tree, mesh, rules: Iterable | None = None):
    """``NamedSharding`` pytree (on ``mesh``) for params; see ``logical_to_specs``."""
    specs = logical_to_specs(axes_tree, shapes_tree, mesh, rules)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def shard(tree, shardings):
    """Place a pytree on devices (device-to-device when it is already on them; no host round trip)."""
    return jax.device_put(tree, shardings)


def batch_shards(mesh) -> int:
    """How many ways a batch is split on ``mesh`` (1 without a mesh)."""
    return 1 if mesh is None else int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_spec(ndim: int, rows: int, mesh) -> P:
    """Rows over ``(data, fsdp)`` when they divide evenly, else replicated; other dims replicated."""
    if rows % batch_shards(mesh):
        return P()
    return P(BATCH_AXES, *([None] * (ndim - 1)))


def cache_shardings(cache, mesh):
    """KV cache ``k``/``v`` ``[layers, B, S, kv_heads, D]`` (or per-layer ``[B, S, kv_heads, D]``) and
    ``valid [B, S]``: rows over the batch axes, kv heads over ``tensor``."""
    def one(x):
        if x.ndim == 2:  # valid [B, S]
            return NamedSharding(mesh, batch_spec(2, x.shape[0], mesh))
        spec = [None] * x.ndim
        if x.shape[-4] % batch_shards(mesh) == 0:
            spec[-4] = BATCH_AXES
        if x.shape[-2] % mesh.shape["tensor"] == 0:
            spec[-2] = "tensor"
        return NamedSharding(mesh, P(*spec))

    return jax.tree.map(one, cache)
