"""Which sampled pairs a phase trains on, in the global order, whatever the number of hosts.

A phase's collection samples prompts from the global stream, batch after batch; each host samples, decodes and
annotates the rows of its batch shards. Some pairs are not kept (identical, or tied under ``tied_pairs=drop``),
so the phase samples on until it has K·B kept pairs. The phase trains on the *first* K·B kept pairs in stream
order: kept pair k goes to step ``k // B``, slot ``k % B`` of that step's global batch, and the host that owns
that slot (``distributed.global_rows``) must hold it. A kept pair sampled on one host may belong in another
host's slot, so:

1. every host gathers every host's keep mask (``distributed.all_gather``): each knows every kept row's stream
   position (``stream_positions``), hence the first K·B and their slots (``phase_plan``);
2. when a host's slots hold only its own rows (one process; ``identical_pairs=shrink``, which keeps every row),
   it takes them; otherwise each host sends the rows it sampled for any slot, padded to the same count, in one
   gather per pair field, and takes its own (``exchange``).

The same seed thus trains the same pairs, in the same slots, on any number of hosts (with a deterministic
annotator). Stream position ``t·B + r``: row ``r`` of the phase's ``t``-th global batch; host p sampled rows
``rows_by_host[p]`` of each batch (``host_rows``), in that order.
"""

from __future__ import annotations

import jax
import numpy as np

from bpo_jax.runtime import distributed
from bpo_jax.runtime import sharding as shd


def host_rows(mesh, batch_size: int) -> list[np.ndarray]:
    """Each process's positions in a global batch of ``batch_size`` rows, in process order: the rows of its batch
    shards (``distributed.host_batch_shards``; shard ``s`` holds rows ``[s·B/S, (s+1)·B/S)``), as
    ``distributed.host_batch_rows`` gives this process's own. One process (or no mesh): every row."""
    if mesh is None or jax.process_count() == 1:
        return [np.arange(batch_size)]
    per = batch_size // shd.batch_shards(mesh)
    return [np.concatenate([np.arange(s * per, (s + 1) * per) for s in shards])
            for _, shards in sorted(distributed.host_batch_shards(mesh).items())]


def stream_positions(rows: np.ndarray, batches: int, batch_size: int) -> np.ndarray:
    """``[batches · len(rows)]``: the stream position of each row a host sampled, in its sampling order (batch
    ``t``'s local row ``j`` is at ``t·batch_size + rows[j]``)."""
    return (np.arange(batches)[:, None] * batch_size + np.asarray(rows)[None]).reshape(-1)


def phase_plan(keeps: np.ndarray, rows_by_host: list, batch_size: int, steps: int) -> list[tuple]:
    """Where each host's phase rows come from: for host p, ``(source_host, source_index)`` arrays of
    ``steps · len(rows_by_host[p])`` entries, step-major, each step's in the order of ``rows_by_host[p]`` (the
    layout ``distributed.global_rows`` assembles a step from). ``keeps [P, n]``: each host's keep mask over
    the rows it sampled, in its sampling order. Raises ``ValueError`` when fewer than ``steps · batch_size``
    rows are kept."""
    keeps = np.asarray(keeps, bool)
    hosts, n = keeps.shape
    batches = n // len(rows_by_host[0])
    pos = np.stack([stream_positions(r, batches, batch_size) for r in rows_by_host])
    src_host, src_index = np.indices((hosts, n))
    order = np.argsort(pos[keeps], kind="stable")[:steps * batch_size]
    if len(order) < steps * batch_size:
        raise ValueError(f"{int(keeps.sum())} kept rows; a phase of {steps} steps needs {steps * batch_size}")
    src_host, src_index = src_host[keeps][order], src_index[keeps][order]
    plans = []
    for rows in rows_by_host:
        slots = (np.arange(steps)[:, None] * batch_size + np.asarray(rows)[None]).reshape(-1)
        plans.append((src_host[slots], src_index[slots]))
    return plans


def rows_to_send(plans: list[tuple], host: int) -> np.ndarray:
    """The sorted indices of ``host``'s sampled rows that some host's plan takes."""
    return np.unique(np.concatenate([i[h == host] for h, i in plans]))


def exchange(local: dict, plans: list[tuple], me: int) -> dict:
    """This host's phase rows (``plans[me]``) of every field of ``local`` (its sampled rows, leading row axis).
    A collective when any plan takes a row from another host: then every host calls it with the same plans."""
    if all((h == p).all() for p, (h, _) in enumerate(plans)):
        return {k: v[plans[me][1]] for k, v in local.items()}
    sent = [rows_to_send(plans, q) for q in range(len(plans))]
    width = max(len(s) for s in sent)
    mine = np.pad(sent[me], (0, width - len(sent[me])))  # padded with row 0: never taken
    src_host, src_index = plans[me]
    slot = np.asarray([np.searchsorted(sent[h], i) for h, i in zip(src_host, src_index)], np.int64)
    return {k: distributed.all_gather(v[mine])[src_host, slot] for k, v in local.items()}
