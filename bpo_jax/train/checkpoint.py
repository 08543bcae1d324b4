"""Checkpoints of a run (orbax ``CheckpointManager``): the train state, the phase's preference pairs and the
loop's position, so that the same command on the same ``run_dir`` resumes exactly.

The frozen base weights are not written (they are the model the run was started from, reloaded by the same
command); a fingerprint of them is, and a resume with different base weights is refused.

A step counts once orbax has committed it, so a run killed while saving leaves the previous checkpoint as
the newest: on a local disk orbax writes each step to a temporary folder and renames it into place; on GCS
(where a folder rename is a copy and delete per object) it writes into the step's folder and commits it by
writing ``commit_success.txt`` last. "Is there a checkpoint" (``has_checkpoint``, ``Checkpointer.steps``) means
a committed step, as orbax lists them. The manager keeps the last ``keep`` of them.

With several processes every host writes its shards of the state and of the pairs (global arrays) to the
shared run directory, and the JSON metadata holds one prompt-stream state per host; a resume with another
number of processes is refused. A different mesh with the same devices restores fine (orbax reshards).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from bpo_jax.runtime import distributed
from bpo_jax.runtime import run_dir as rd

log = logging.getLogger(__name__)

COMMIT_FILE = "commit_success.txt"  # what commits a step on an object store (orbax's CommitFileTemporaryPath)


class IncompatibleCheckpoint(ValueError):
    """The run directory's checkpoint cannot continue with this command's model or processes."""


def fingerprint(params) -> list[list[float]]:
    """Per leaf, ``[sum, sum of |x|]`` in float32: cheap, and any change of model or dtype changes them. One
    compiled program for the whole tree (eagerly, two small programs per leaf shape would each compile)."""
    return [[float(a), float(b)] for a, b in jax.device_get(_leaf_sums(params))]


@jax.jit
def _leaf_sums(params) -> list:
    return [jax.numpy.stack([jax.numpy.sum(x), jax.numpy.sum(jax.numpy.abs(x))])
            for x in (leaf.astype(jax.numpy.float32) for leaf in jax.tree.leaves(params))]


def same_weights(saved, now) -> bool:
    """Fingerprints equal up to float32 summation order (which depends on the sharding)."""
    saved, now = np.asarray(saved, np.float64), np.asarray(now, np.float64)
    if saved.ndim == 1:  # written before the |x| sums were kept
        return saved.shape == now[:, 0].shape and np.allclose(saved, now[:, 0], rtol=1e-5, atol=1e-4)
    if saved.shape != now.shape:
        return False
    return bool(np.all(np.abs(saved - now) <= 1e-5 * (np.abs(saved[:, 1:]) + np.abs(now[:, 1:]) + 1e-6)))


def checkpoint_dir(run_dir: str):
    """Where a run directory's checkpoints live (one folder per step)."""
    return rd.path(run_dir, "checkpoints")


def has_checkpoint(run_dir: str) -> bool:
    """Whether ``run_dir`` holds a committed checkpoint (a resume), without opening a checkpoint manager: a step
    folder that a killed save left uncommitted does not count (orbax's own listing)."""
    return bool(ocp.utils.checkpoint_steps(checkpoint_dir(run_dir)))


class Checkpointer:
    """The run directory's checkpoints, the last ``keep`` of them kept. ``logs``: the run's JSON-lines logs
    (``bpo_jax.runtime.run_dir.JsonlLog``, e.g. its ``metrics.jsonl``) whose waiting lines every ``save`` writes
    before it saves the step. The base weights' fingerprint is computed once per base (the same arrays at every
    save of a run), not at every save: over SmolLM2-135M it is a pass over all weights, ~0.3 s on 2 cores."""

    def __init__(self, run_dir: str, keep: int, *, logs: Sequence[rd.JsonlLog] = ()):
        self.logs = tuple(logs)
        self._base_fp: tuple[list, list] | None = None  # (the base's leaves, their fingerprint)
        root = run_dir if distributed.is_remote(run_dir) else str(rd.path(run_dir).resolve())
        self.directory = str(checkpoint_dir(root))
        self._options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, item_handlers=_handlers(), options=self._options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def _fingerprint(self, base) -> list:
        """``fingerprint(base)``, recomputed only when ``base`` is not the arrays of the last call."""
        leaves = jax.tree.leaves(base)
        if self._base_fp is None or len(leaves) != len(self._base_fp[0]) or \
                any(a is not b for a, b in zip(leaves, self._base_fp[0])):
            self._base_fp = (leaves, fingerprint(base))
        return self._base_fp[1]

    def save(self, step: int, state, pairs: dict | None, meta: dict) -> None:
        """Save synchronously: a step saved is a step that survives a SIGKILL, and no metrics row is written
        twice. (Orbax's asynchronous save would overlap the write, ~0.25 s for SmolLM2's 3-member LoRA state on 2
        cores, with the next phase; a SIGKILL during it would then lose the step after its rows were stored.)
        ``pairs``: global arrays (``distributed.global_rows``) or None; ``meta``: JSON, the same on every host.
        The lines waiting in ``logs`` (a remote run directory's) are written first, so the rows up to this step
        are stored before the step is and a resume from it finds them."""
        for log_file in self.logs:
            log_file.flush()
        # Orbax cannot store zero-size arrays: an absent pairs buffer is one placeholder array.
        packed = pairs if pairs else {"_none": np.zeros((1,), np.int32)}
        meta = {**meta, "base_fingerprint": self._fingerprint(state.base),
                "process_count": distributed.process_count()}
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state.replace(base=None)),
                                                         pairs=ocp.args.StandardSave(packed),
                                                         meta=ocp.args.JsonSave(meta)), force=True)
        self._manager.wait_until_finished()

    def restore(self, step: int, template, *, mesh=None):
        """``(state, this host's pairs or None, meta)`` to resume the run: the checkpoint must have been written by
        as many processes as this run has (each host's prompt stream and pairs are its own). ``template`` is a
        fresh state of the same run: it gives the shapes, dtypes and shardings, and its base weights, which must be
        those the checkpoint was made with. ``mesh``: where the pairs go (rows over its batch axes), as the loop
        placed them."""
        meta, target = self._meta_and_target(step, template)
        saved = meta.get("process_count", 1)
        if saved != distributed.process_count():
            raise IncompatibleCheckpoint(
                f"the checkpoint at step {step} in {self.directory} was written by {saved} processes; "
                f"this run has {distributed.process_count()}. Resume with {saved} processes (hosts), or start a new "
                f"run_dir")
        if isinstance(meta.get("prompts"), dict):  # written before prompt states were kept per host
            meta["prompts"] = [meta["prompts"]]
        pairs_target = jax.tree.map(lambda m: _row_sharded(m, mesh),
                                    dict(self._manager.item_metadata(step)["pairs"]))
        out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                  pairs=ocp.args.StandardRestore(pairs_target)))
        pairs = None if "_none" in out["pairs"] else distributed.local_rows(dict(out["pairs"]), mesh)
        return out["state"].replace(base=template.base), pairs, meta

    def restore_state(self, step: int, template):
        """The train state at ``step`` alone, to read (``evaluate``, ``compare``), not to resume: on any number of
        processes and any mesh (``template``'s shardings), whatever the run was written by. The base weights
        must be the checkpoint's, as for ``restore``."""
        _, target = self._meta_and_target(step, template)
        out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        return out["state"].replace(base=template.base)

    def _meta_and_target(self, step: int, template):
        """``(meta, the state's restore target)`` at ``step``, after checking that the base weights and the
        state's shapes are ``template``'s (``IncompatibleCheckpoint`` otherwise)."""
        meta = dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
        if not same_weights(meta["base_fingerprint"], self._fingerprint(template.base)):
            raise IncompatibleCheckpoint(f"the checkpoint at step {step} in {self.directory} was made from different "
                                         f"base weights than the model loaded now; load the run's original "
                                         f"model")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, template.replace(base=None))
        saved = self._manager.item_metadata(step)["state"]
        if _behavior_saved_as_members(saved, target):  # restored as written; state.merge_legacy_behavior merges it
            target = target.replace(behavior=target.trainable)
        _check_shapes(step, saved, target)
        return meta, target

    def restore_latest(self, template, *, mesh=None):
        """``(step, state, pairs, meta)`` from the newest intact checkpoint, or None when there is none.

        A checkpoint that cannot be read (truncated files, a killed copy) is reported with its step and error,
        set aside whole into ``<run_dir>/checkpoints_broken/<step>`` (never deleted) and the next older one is
        tried. A checkpoint that reads but does not fit this run (``IncompatibleCheckpoint``) stops the run.
        Every step's outcome is decided from all hosts' attempts: with several processes each host first reads,
        on its own, exactly what it will restore (``_readable_here``: its own shards; no collective, so a host
        that cannot read them fails alone), then all agree; one host's failure makes every host fall back to the
        same older step, so no two hosts resume different states and none is left waiting inside orbax's restore.
        """
        broken = []
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, template.replace(base=None))
        for step in distributed.gather_json(sorted(self.steps(), reverse=True))[0]:  # the primary's listing
            restored: list = []
            outcomes = self._agree(lambda: self._readable_here(step, target, mesh)
                                   if distributed.process_count() > 1 else None)
            if not any(outcomes):  # every host can read it alone: orbax's restore (which syncs the hosts) is safe
                outcomes = self._agree(lambda: self.restore(step, template, mesh=mesh), keep=restored)
            if bad := [o for o in outcomes if o and o[0] == "incompatible"]:
                raise IncompatibleCheckpoint(bad[0][1])
            if failed := [i for i, o in enumerate(outcomes) if o]:
                where = "" if len(outcomes) == 1 else f" on process{'es' if len(failed) > 1 else ''} " \
                                                     f"{', '.join(map(str, failed))}"
                log.warning(f"warning: checkpoint step {step} in {self.directory} is unreadable{where} "
                     f"({outcomes[failed[0]][1]})")
                broken.append(step)
                continue
            if broken:
                self._set_aside(broken)
                log.warning(f"warning: resuming from step {step}, the newest intact checkpoint")
            return (step, *restored[0])
        if broken:
            raise IncompatibleCheckpoint(f"no checkpoint in {self.directory} is readable (steps {broken}); they are "
                                         f"left in place. Start a new run_dir, or restore a copy of the directory")
        return None

    @staticmethod
    def _agree(attempt, keep: list | None = None) -> list:
        """Every host's outcome of ``attempt()``, on every host: None (it worked; its result appended to
        ``keep``), ``["incompatible", message]`` or ``["broken", first line of the error]``."""
        outcome = None
        try:
            result = attempt()
            if keep is not None:
                keep.append(result)
        except IncompatibleCheckpoint as err:
            outcome = ["incompatible", str(err)]
        except Exception as err:  # noqa: BLE001  orbax / TensorStore raise many kinds for unreadable data
            outcome = ["broken", (str(err).strip().splitlines() or [type(err).__name__])[0][:300]]
        return distributed.gather_json(outcome)

    def _readable_here(self, step: int, target, mesh) -> None:
        """Read, on this host alone, the part of checkpoint ``step`` that this host restores: for each array, the
        index domains of this host's shards under the restore's shardings (``target``: the state's; the pairs'
        rows over ``mesh``'s batch axes, as ``restore`` places them), each domain once, straight from its
        TensorStore files (no orbax manager: its restore and bookkeeping talk to the other hosts); raises what
        the read raises. Per host that is its share of the state (1/P of what is split over hosts, all of what
        is replicated), not the whole checkpoint.

        Why each host checks its own shards rather than the primary checking for all: the failure this guards
        against is one host's view of the shared storage (a stale mount, a damaged cache), and only that host's
        own read sees it; a check by one host would let the others enter orbax's restore and wait there for the
        host that fails."""
        import json

        import tensorstore as ts
        from etils import epath

        leaves = {_key_names(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]}
        for item in ("state", "pairs"):
            folder = epath.Path(self.directory) / str(step) / item
            meta = json.loads((folder / "_METADATA").read_text())
            base = str(folder) if distributed.is_remote(str(folder)) else f"file://{folder}"
            for entry in meta["tree_metadata"].values():
                value = entry["value_metadata"]
                if value["value_type"] not in ("jax.Array", "np.ndarray") or value.get("skip_deserialize"):
                    continue
                keys = tuple(str(k["key"]) for k in entry["key_metadata"])
                spec = {"driver": "zarr3" if meta.get("use_zarr3") else "zarr", "path": f"{'.'.join(keys)}/",
                        "kvstore": {"driver": "ocdbt", "base": f"{base}/"}}
                store = ts.open(spec, open=True).result()
                shape = tuple(store.shape)
                sharding = (_sharding_if_fits(leaves.get(keys), shape) if item == "state" else
                            _row_sharded(jax.ShapeDtypeStruct(shape, store.dtype.numpy_dtype), mesh).sharding)
                for index in _local_domains(sharding, shape):
                    _read(store, index)

    def _set_aside(self, steps) -> None:
        """Move unreadable checkpoints out of the manager's directory (so new saves never collide with them) to
        ``<run_dir>/checkpoints_broken/<step>`` (``<step>.<n>`` when an earlier resume set one aside there), never
        deleting an object before its copy exists (``_move_folder``)."""
        from etils import epath

        aside = epath.Path(self.directory).parent / "checkpoints_broken"

        def move():  # the primary moves; every host hears how it went
            if not distributed.is_primary():
                return
            for step in steps:
                dest, n = aside / f"{step}", 1
                while dest.exists():  # set aside before, by an earlier resume: keep both
                    dest, n = aside / f"{step}.{n}", n + 1
                _move_folder(epath.Path(self.directory) / f"{step}", dest)
                log.warning(f"warning: moved the unreadable checkpoint of step {step} to {dest}")

        distributed.agreed(move)
        self._manager.close()
        self._manager = ocp.CheckpointManager(self.directory, item_handlers=_handlers(), options=self._options)

    def close(self) -> None:
        self._manager.close()


def _move_folder(src, dest) -> None:
    """Move the folder ``src`` to ``dest`` (``epath`` paths). On a local disk a rename. On an object store,
    where a folder is only a name prefix and a rename would copy and delete object by object in no useful
    order: every object is copied (server-side), the copies are checked (same names and sizes) before anything
    is deleted, then the step's ``commit_success.txt`` is deleted first, so an interrupted delete leaves an
    uncommitted step that orbax neither lists nor restores (and clears when it saves that step again)."""
    if not distributed.is_remote(str(src)):
        dest.parent.mkdir(parents=True, exist_ok=True)
        src.rename(dest)
        return
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(src))
    target = fsspec.core.url_to_fs(str(dest))[1]
    sizes = {name[len(root):]: info["size"] for name, info in fs.find(root, detail=True).items()}
    fs.copy([root + name for name in sizes], [target + name for name in sizes])
    fs.invalidate_cache(target)
    copied = {name[len(target):]: info["size"] for name, info in fs.find(target, detail=True).items()}
    if missing := [name for name in sizes if copied.get(name) != sizes[name]]:
        raise OSError(f"copying {src} to {dest} left {len(missing)} of {len(sizes)} files uncopied (e.g. "
                      f"{missing[0].lstrip('/')}); nothing was deleted")
    (src / COMMIT_FILE).unlink(missing_ok=True)
    src.rmtree()


def _handlers():
    return {"state": ocp.StandardCheckpointHandler(), "pairs": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler()}


def _key_names(path) -> tuple[str, ...]:
    """A tree path as names: the saved tree is dicts where the state has attributes, so they compare by name."""
    return tuple(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)


def _sharding_if_fits(leaf, shape):
    """The restore target ``leaf``'s sharding for a saved array of ``shape``; None (read it whole) when this run
    has no such array or another shape (``restore`` then refuses the checkpoint as incompatible, naming it)."""
    return leaf.sharding if leaf is not None and tuple(leaf.shape) == tuple(shape) else None


def _local_domains(sharding, shape) -> list[tuple[slice, ...]]:
    """The distinct index domains of ``shape`` that ``sharding`` puts on this host's devices (a domain held by
    several local devices, e.g. replicated over ``tensor``, once); the whole array without a sharding."""
    if sharding is None:
        return [tuple(slice(0, n) for n in shape)]
    domains = {}
    for index in sharding.addressable_devices_indices_map(shape).values():
        full = tuple(slice(*sl.indices(n)[:2]) for sl, n in zip(index, shape))
        domains[tuple((sl.start, sl.stop) for sl in full)] = full
    return list(domains.values())


def _read(store, index) -> np.ndarray:
    """One read of ``store[index]`` into host memory (the unit the readability check costs)."""
    return store[index].read().result()


def _behavior_saved_as_members(saved, target) -> bool:
    """Whether checkpoint ``saved`` (orbax's metadata tree of the state) holds π_β shaped like the trainable
    leaves, where this run keeps it in ``state.behavior_of``'s form: written before π_β was kept so (LoRA: the
    members' factors, not merged; full FT: the float32 masters with their ensemble axis)."""
    def shapes(tree):
        return {_key_names(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

    try:
        members = shapes(saved["behavior"])  # orbax's tree metadata: a mapping by the state's field names
    except (KeyError, TypeError):
        return False
    return target.behavior is not None and members == shapes(target.trainable) != shapes(target.behavior)


def _check_shapes(step: int, saved, target) -> None:
    """Refuse a checkpoint whose arrays do not have this run's shapes (e.g. another ``lora_rank``), naming them."""
    flat_saved = {_key_names(p): m for p, m in jax.tree_util.tree_flatten_with_path(saved)[0]}
    wrong = []
    for path, want in jax.tree_util.tree_flatten_with_path(target)[0]:
        got = flat_saved.get(_key_names(path))
        if got is None or tuple(got.shape) != tuple(want.shape):
            name = jax.tree_util.keystr(path)
            wrong.append(f"{name}: saved {None if got is None else tuple(got.shape)}, this run {tuple(want.shape)}")
    if wrong:
        raise IncompatibleCheckpoint(f"the checkpoint at step {step} does not fit this run's shapes (another model, "
                                     f"LoRA rank or ensemble size?): " + "; ".join(wrong[:3]) +
                                     (f"; and {len(wrong) - 3} more" if len(wrong) > 3 else ""))


def _row_sharded(metadata, mesh) -> jax.ShapeDtypeStruct:
    """A restore target for one saved pairs array: rows over the mesh's batch axes (as ``global_rows`` put
    them), or the default device without a mesh."""
    shape, dtype = tuple(metadata.shape), metadata.dtype
    if mesh is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    else:
        rows = shape[0] % distributed.batch_shards(mesh) == 0
        spec = jax.sharding.PartitionSpec(distributed.BATCH_AXES if rows else None)
        sharding = jax.sharding.NamedSharding(mesh, spec)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
