"""Slices: groups of hosts joined to each other only by the data-centre network (DCN), and which mesh axes cross it.

A TPU multislice run is several slices, each with its own fast chip-to-chip interconnect (ICI); between slices
collectives go over the DCN, an order of magnitude slower. A device reports its slice in ``slice_index`` (TPU;
CPU and GPU devices report none). bpo_jax keeps every mesh axis but ``data`` inside a slice: across slices the
data axis's collective is one gradient all-reduce per step, where fsdp would gather weights at every layer and
tensor at every matmul (MaxText's ``dcn_data_parallelism``).

- ``process_slices(devices)``: ``{process: slice}`` as the devices report it (0 for all without ``slice_index``).
- ``slice_layout(mesh_slices, devices)``: ``{process: slice}`` the mesh is built over. ``0`` (auto): as reported;
  ``1``: one slice, whatever they report (then every axis may cross the DCN, with a warning); ``N``: the reported
  slices, which must be ``N``, or where the devices report one slice (CPU, GPU processes), ``N`` equal groups of
  consecutive processes: how CPU processes simulate slices.
- ``dcn_axes(devices, slice_of)``: the axes of a device array along which two slices meet.
- ``working_shape(...)``: one shape that keeps tensor groups inside a host and only ``data`` across slices.

Everything here is a function of the global device list, which every host sees the same: every host makes the
same decision without a collective.
"""

from __future__ import annotations

import numpy as np

MESH_SLICES_AUTO = 0


def parse_mesh_slices(value) -> int:
    """The setting ``mesh_slices`` as a count: ``auto`` (or 0) -> ``MESH_SLICES_AUTO``, else a positive integer."""
    text = str(value).strip().lower()
    if text in ("auto", "0"):
        return MESH_SLICES_AUTO
    if not text.isdigit():
        raise ValueError(f"mesh_slices={value!r}: auto (0) or a positive number of slices")
    return int(text)


def process_slices(devices) -> dict[int, int]:
    """``{process index: slice}``, slices renumbered 0, 1, ... in the order of their ``slice_index``; every process
    in slice 0 where the devices carry no ``slice_index``."""
    reported = {d.process_index: getattr(d, "slice_index", 0) for d in devices}
    rank = {s: i for i, s in enumerate(sorted(set(reported.values())))}
    return {p: rank[s] for p, s in sorted(reported.items())}


def slice_layout(mesh_slices: int, devices) -> dict[int, int]:
    """``{process: slice}`` the mesh is built over for the setting ``mesh_slices`` (0 = auto); ``ValueError``
    (one line) when the setting does not fit the processes or the slices the devices report."""
    reported = process_slices(devices)
    count = len(set(reported.values()))
    processes = sorted(reported)
    if mesh_slices in (MESH_SLICES_AUTO, count):
        return reported
    if mesh_slices == 1:
        return dict.fromkeys(processes, 0)
    if count > 1:
        raise ValueError(f"mesh_slices={mesh_slices}, but the devices report {count} slices (slice_index); use "
                         f"mesh_slices=auto")
    if len(processes) % mesh_slices:
        raise ValueError(f"mesh_slices={mesh_slices} does not split {len(processes)} processes into equal slices "
                         f"of consecutive processes")
    per = len(processes) // mesh_slices
    return {p: i // per for i, p in enumerate(processes)}


def slice_count(slice_of: dict[int, int]) -> int:
    return len(set(slice_of.values()))


def dcn_axes(devices: np.ndarray, axis_names, slice_of: dict[int, int]) -> list[str]:
    """The names of the axes of ``devices`` (a mesh's device array) along which devices of two slices meet."""
    ids = np.vectorize(lambda d: slice_of.get(d.process_index, 0), otypes=[int])(devices)
    return [name for i, name in enumerate(axis_names) if not np.all(ids == np.take(ids, [0], axis=i))]


def working_shape(devices: int, per_host: int, tensor: int, slices: int) -> str:
    """``mesh_data=S mesh_fsdp=F mesh_tensor=T``: ``data`` one per slice, ``tensor`` the largest divisor of a
    host's ``per_host`` devices up to the requested ``tensor``, ``fsdp`` the rest (split over each slice's
    hosts)."""
    tensor = max(t for t in range(1, per_host + 1) if per_host % t == 0 and t <= tensor)
    return f"mesh_data={slices} mesh_fsdp={devices // (slices * tensor)} mesh_tensor={tensor}"
