"""One process of ``test_flat_costs.py``'s group (``python flat_costs_worker.py OUT_DIR``, with bpo_jax's launch
variables): it measures what this host pays, with counters around the functions that do the work, and writes
``OUT_DIR/process_<i>.json``. Every process runs the same steps in the same order (each step has collectives).

- ``json_lowerings``: how many programs ``gather_json`` lowered for payloads of 10..250 bytes after a first call
  (one width), then for 300..500 bytes (the next width).
- ``checkpoint_read_bytes``: what ``restore_latest``'s readability check read on this host, next to what this
  host restores (``expected``) and the whole checkpoint (``total``); ``restored_ok``: the state came back exact.
- ``export_blocks``: the bytes of each array ``gather_to_primary`` gathered during the export; the primary also
  writes the same weights from host memory (``reference/``), which the test compares byte for byte.
"""

from __future__ import annotations

import json
import os
import sys

import flax
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bpo_jax.models import Decoder, init_params, param_axes, save_pretrained
from bpo_jax.runtime import cluster, distributed
from bpo_jax.runtime import sharding as shd
from bpo_jax.train import checkpoint
from testing import tiny_model_config  # tests/ is on PYTHONPATH

EXPORT_BLOCK_BYTES = 4096  # one layer of the tiny model's q (32 x 32 float32); gate/up/down layers are 8192


@flax.struct.dataclass
class _State:  # what the checkpointer needs of a train state: frozen ``base`` and the arrays it saves
    base: dict
    trainable: dict


def json_lowerings() -> list[int]:
    """Lowerings during ``gather_json`` of payloads within one width, then within the next one."""
    counts = [0]  # the first call's

    def listen(event, _secs, **_):
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            counts[-1] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    distributed.gather_json("x" * 10)  # the first width, and the size collective
    for sizes in (range(10, 250, 40), range(300, 500, 40)):
        counts.append(0)
        for n in sizes:
            assert distributed.gather_json("x" * (n + jax.process_index())) == ["x" * n, "x" * (n + 1)]
    return counts[1:]


def checkpoint_reads(run_dir: str) -> dict:
    """Save a sharded state and pairs, then resume: the bytes the readability check read here."""
    mesh = distributed.make_mesh(data=1, fsdp=4)
    split = NamedSharding(mesh, P("fsdp", None))
    a = jax.device_put(np.arange(16 * 32, dtype=np.float32).reshape(16, 32), split)
    b = jax.device_put(np.arange(4, dtype=np.float32), NamedSharding(mesh, P()))
    state = _State(base={"w": np.ones((3,), np.float32)}, trainable={"a": a, "b": b})
    pairs = distributed.global_rows({"ids": np.full((4, 8), jax.process_index(), np.int32)}, mesh)
    ckpt = checkpoint.Checkpointer(run_dir, keep=2)
    ckpt.save(1, state, pairs, {"prompts": []})
    read = []
    plain = checkpoint._read

    def counted(store, index):
        out = plain(store, index)
        read.append(int(out.nbytes))
        return out

    checkpoint._read = counted
    template = _State(base=state.base, trainable={"a": jax.device_put(np.zeros(a.shape, a.dtype), split),
                                                  "b": jax.device_put(np.zeros(b.shape, b.dtype), b.sharding)})
    step, got, got_pairs, _ = ckpt.restore_latest(template, mesh=mesh)
    checkpoint._read = plain
    ckpt.close()
    ok = (step == 1 and np.array_equal(distributed.gather_to_host(got.trainable["a"]), np.asarray(
        distributed.gather_to_host(a))) and np.array_equal(got_pairs["ids"], np.full((4, 8), jax.process_index())))
    mine = (16 * 32 * 4) // 2 + 4 * 4 + (4 * 8 * 4)  # half of a, all of b, this host's 4 pair rows
    return {"read": read, "expected": mine, "total": 16 * 32 * 4 + 4 * 4 + 8 * 8 * 4, "restored_ok": bool(ok),
            "misfit": misfit(run_dir + "_misfit", template, mesh)}


def misfit(run_dir: str, template, mesh) -> str:
    """A checkpoint whose ``a`` has another shape (6 rows: no split over 4 devices) is refused as incompatible,
    not set aside as unreadable: the error's first words, or what happened instead."""
    other = template.replace(trainable={**template.trainable, "a": np.zeros((6, 32), np.float32)})
    ckpt = checkpoint.Checkpointer(run_dir, keep=2)
    ckpt.save(1, other, None, {"prompts": []})
    try:
        ckpt.restore_latest(template, mesh=mesh)
        return "restored"
    except checkpoint.IncompatibleCheckpoint as err:
        aside = os.path.isdir(os.path.join(run_dir, "checkpoints_broken"))
        return "set aside" if aside else str(err)[:60]
    finally:
        ckpt.close()


def export_blocks(out_dir: str) -> list[int]:
    """Export sharded tiny-model weights in small blocks; the primary also writes them from host memory."""
    cfg = tiny_model_config()
    host = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(0)))
    mesh = distributed.make_mesh(data=1, fsdp=4)
    params = shd.shard(host, shd.logical_to_sharding(param_axes(cfg), host, mesh))
    blocks = []
    plain = multihost_utils.process_allgather

    def counted(tree, tiled=False):
        blocks.extend(int(x.nbytes) for x in jax.tree.leaves(tree))
        return plain(tree, tiled=tiled)

    multihost_utils.process_allgather = counted
    distributed.GATHER_BYTES, default = EXPORT_BLOCK_BYTES, distributed.GATHER_BYTES
    try:
        save_pretrained(Decoder.from_params(cfg, params), None, os.path.join(out_dir, "sharded"))
    finally:
        multihost_utils.process_allgather, distributed.GATHER_BYTES = plain, default
    save_pretrained(Decoder.from_params(cfg, host), None, os.path.join(out_dir, "reference"))
    return blocks


def main(out_dir: str) -> None:
    cluster.initialize()
    result = {"json_lowerings": json_lowerings(),
              "checkpoint": checkpoint_reads(os.path.join(out_dir, "run")),
              "export_blocks": export_blocks(out_dir)}
    with open(os.path.join(out_dir, f"process_{jax.process_index()}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
