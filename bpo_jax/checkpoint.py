"""Checkpoints of a run (orbax ``CheckpointManager``): the train state, the phase's preference pairs and the
loop's position, so that the same command on the same ``run_dir`` resumes exactly.

The frozen base weights are not written (they are the model the run was started from, reloaded by the same
command); a fingerprint of them is, and a resume with different base weights is refused.

Orbax writes each checkpoint to a temporary directory and renames it when complete, so a run killed while
saving leaves the previous checkpoint intact; the manager keeps the last ``keep`` of them.

With several processes every host writes its shards of the state and of the pairs (global arrays) to the
shared run directory, and the JSON metadata holds one prompt-stream state per host; a resume with another
number of processes is refused. A different mesh with the same devices restores fine (orbax reshards).
"""

from __future__ import annotations

import jax
import numpy as np
import orbax.checkpoint as ocp

from bpo_jax import distributed
from bpo_jax import run_dir as rd


class IncompatibleCheckpoint(ValueError):
    """The run directory's checkpoint cannot continue with this command's model or processes."""


def fingerprint(params) -> list[float]:
    """Per-leaf float64 sums of the weights: cheap, and any change of model or dtype changes them."""
    return [float(np.asarray(jax.numpy.sum(x.astype(jax.numpy.float32)))) for x in jax.tree.leaves(params)]


class Checkpointer:
    def __init__(self, run_dir: str, keep: int):
        root = run_dir if distributed.is_remote(run_dir) else str(rd.path(run_dir).resolve())
        self.directory = str(rd.path(root, "checkpoints"))
        handlers = {"state": ocp.StandardCheckpointHandler(), "pairs": ocp.StandardCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, item_handlers=handlers,
                                              options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, pairs: dict | None, meta: dict) -> None:
        """Save synchronously (a checkpoint on disk is a checkpoint that survives a SIGKILL). ``pairs``: global
        arrays (``distributed.global_rows``) or None; ``meta``: JSON, the same on every host."""
        # Orbax cannot store zero-size arrays: an absent pairs buffer is one placeholder array.
        packed = pairs if pairs else {"_none": np.zeros((1,), np.int32)}
        meta = {**meta, "base_fingerprint": fingerprint(state.base), "process_count": distributed.process_count()}
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state.replace(base=None)),
                                                         pairs=ocp.args.StandardSave(packed),
                                                         meta=ocp.args.JsonSave(meta)), force=True)
        self._manager.wait_until_finished()

    def restore(self, step: int, template, *, mesh=None):
        """``(state, this host's pairs or None, meta)``. ``template`` is a fresh state of the same run: it gives
        the shapes, dtypes and shardings, and its base weights, which must be those the checkpoint was made with.
        ``mesh``: where the pairs go (rows over its batch axes), as the loop placed them."""
        meta = dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
        saved = meta.get("process_count", 1)
        if saved != distributed.process_count():
            raise IncompatibleCheckpoint(
                f"the checkpoint at step {step} in {self.directory} was written by {saved} processes; "
                f"this run has {distributed.process_count()}. Resume with {saved} processes (hosts), or start a new "
                f"run_dir")
        if not np.allclose(meta["base_fingerprint"], fingerprint(template.base), rtol=1e-6):
            raise IncompatibleCheckpoint(f"the checkpoint at step {step} in {self.directory} was made from different "
                                         f"base weights than the model loaded now; resume with the run's original "
                                         f"model")
        if isinstance(meta.get("prompts"), dict):  # written before prompt states were kept per host
            meta["prompts"] = [meta["prompts"]]
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, template.replace(base=None))
        pairs_target = jax.tree.map(lambda m: _row_sharded(m, mesh),
                                    dict(self._manager.item_metadata(step)["pairs"]))
        out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                  pairs=ocp.args.StandardRestore(pairs_target)))
        pairs = None if "_none" in out["pairs"] else distributed.local_rows(dict(out["pairs"]))
        return out["state"].replace(base=template.base), pairs, meta

    def close(self) -> None:
        self._manager.close()


def _row_sharded(metadata, mesh) -> jax.ShapeDtypeStruct:
    """A restore target for one saved pairs array: rows over the mesh's batch axes (as ``global_rows`` put
    them), or the default device without a mesh."""
    shape, dtype = tuple(metadata.shape), metadata.dtype
    if mesh is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    else:
        rows = shape[0] % distributed.batch_shards(mesh) == 0
        spec = jax.sharding.PartitionSpec(distributed.BATCH_AXES if rows else None)
        sharding = jax.sharding.NamedSharding(mesh, spec)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
