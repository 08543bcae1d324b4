"""Checkpoints of a run (orbax ``CheckpointManager``): the train state, the phase's preference pairs and the
loop's position, so that the same command on the same ``run_dir`` resumes exactly.

The frozen base weights are not written (they are the model the run was started from, reloaded by the same
command); a fingerprint of them is, and a resume with different base weights is refused.

Orbax writes each checkpoint to a temporary directory and renames it when complete, so a run killed while
saving leaves the previous checkpoint intact; the manager keeps the last ``keep`` of them.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp


def fingerprint(params) -> list[float]:
    """Per-leaf float64 sums of the weights: cheap, and any change of model or dtype changes them."""
    return [float(np.asarray(jax.numpy.sum(x.astype(jax.numpy.float32)))) for x in jax.tree.leaves(params)]


class Checkpointer:
    def __init__(self, run_dir: str, keep: int):
        self.directory = os.path.join(os.path.abspath(run_dir), "checkpoints")
        self._manager = ocp.CheckpointManager(self.directory,
                                              options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, pairs: dict | None, meta: dict) -> None:
        """Save synchronously (a checkpoint on disk is a checkpoint that survives a SIGKILL)."""
        # Orbax cannot store zero-size arrays: an absent pairs buffer is one placeholder array.
        packed = pairs if pairs else {"_none": np.zeros((1,), np.int32)}
        meta = {**meta, "base_fingerprint": fingerprint(state.base)}
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state.replace(base=None)),
                                                         pairs=ocp.args.StandardSave(packed),
                                                         meta=ocp.args.JsonSave(meta)), force=True)
        self._manager.wait_until_finished()

    def restore(self, step: int, template):
        """``(state, pairs or None, meta)``. ``template`` is a fresh state of the same run: it gives the shapes,
        dtypes and shardings, and its base weights, which must be those the checkpoint was made with."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, template.replace(base=None))
        out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                  pairs=ocp.args.StandardRestore(),
                                                                  meta=ocp.args.JsonRestore()))
        meta = dict(out["meta"])
        if not np.allclose(meta["base_fingerprint"], fingerprint(template.base), rtol=1e-6):
            raise ValueError(f"the checkpoint at step {step} in {self.directory} was made from different base "
                             f"weights than the model loaded now; resume with the run's original model")
        pairs = None if "_none" in out["pairs"] else {k: np.asarray(v) for k, v in out["pairs"].items()}
        return out["state"].replace(base=template.base), pairs, meta

    def close(self) -> None:
        self._manager.close()
