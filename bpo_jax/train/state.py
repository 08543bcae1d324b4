"""``TrainState``: one pure pytree with everything a BPO run changes, and the views of it the losses need.

Leaves:
  * ``base``      — the frozen starting weights (the SFT model), in ``param_dtype``. Under LoRA it is stored
                    once and shared by the policy, the behavior LLM and the SFT reference.
  * ``trainable`` — what the optimizer updates, with a leading ensemble axis N: LoRA factors of N adapters, or
                    (full fine-tuning, N = 1) a full copy of the weights.
  * ``behavior``  — π_β, taken from ``trainable`` at each phase boundary (``behavior_of``). LoRA: the ensemble
                    merged by ``ensemble_merge`` into one adapter, its scale folded in
                    (``lora.merged_attachment``: rank r under ``peft_linear``, 1/N of the members' factors;
                    rank N·r under ``mean_delta``), so π_β = ``lora.attach(base, behavior, 1)`` is what the
                    train step's merged ensemble was at that boundary, with nothing to merge when it samples.
                    Full fine-tuning: the one model as the forward reads it, in the compute dtype (matrices cast,
                    norm weights float32; ``ensemble_params``): under bfloat16 half a float32 copy, and the
                    sampler takes it with no cast.
  * ``reference`` — only for ``ema``/``mixup`` (shaped like ``trainable``), ``fixed`` (full weights), and ``sft``
                    when the ensemble starts from adapter folders (their starting factors: the SFT model is
                    then the base plus their merge, as in the paper's official code).
  * ``opt_state`` — one optimizer state per ensemble member (a leading N axis), so each adapter has its own
                    AdamW moments and its own gradient-norm clipping.
  * ``step``, ``phase``, ``rng`` (raw ``uint32`` key data, so checkpoints hold plain arrays).

``trainable``, the ``ema``/``mixup`` reference and the AdamW moments are float32 whatever ``param_dtype`` is
(master weights): a bfloat16 leaf would drop every update below half its ulp (at lr 5e-5, most of them). The
forward casts them to the compute dtype where they are used. ``behavior`` is never updated, only read: LoRA's
merged factors are float32 (the forward casts them), full fine-tuning's weights are already cast.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bpo_jax.config import StepConfig, TrainConfig
from bpo_jax.config.groups import Lora
from bpo_jax.models import lora

Params = Any


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    phase: jax.Array
    rng: jax.Array
    base: Params
    trainable: Params
    behavior: Params
    reference: Params | None
    opt_state: Any


def make_optimizer(cfg) -> optax.GradientTransformation:
    """The run's optimizer (a ``TrainConfig`` or ``StepConfig``): ``cfg.optimizer.build`` over its T steps."""
    return cfg.optimizer.build(cfg.total_steps)


def adapter_params(cfg: TrainConfig | StepConfig | Lora, base: Params, trainable_i: Params) -> Params:
    """The params one ensemble member's forward runs on (``trainable_i`` has no N axis): LoRA in activation
    space (``lora.attach``: base weights plus their float32 factors, no merged copy); full FT: the float32
    master weights themselves."""
    return lora.attach(base, trainable_i, cfg.lora_scale) if cfg.lora_rank else trainable_i


def ensemble_params(cfg: TrainConfig | StepConfig | Lora, base: Params, trainable: Params,
                    compute_dtype=None) -> Params:
    """The merged ensemble as the train step runs it: LoRA: one adapter merged by ``cfg.ensemble_merge``
    attached in activation space (``lora.attach_merged``; ``mean_delta``: the members' factors concatenated
    along the rank axis with scale s/N, exactly base + mean delta); full FT: the one float32 master model. With
    ``compute_dtype`` (the model's ``dtype``), full FT's weights are cast to it ahead of use, except the norm
    weights, which the decoder reads in float32: the same values the step computes with, in a smaller copy."""
    if cfg.lora_rank:
        return lora.attach_merged(base, trainable, cfg.lora_scale, cfg.ensemble_merge)
    return in_compute_dtype(jax.tree.map(lambda x: x[0], trainable), compute_dtype)


def in_compute_dtype(params: Params, compute_dtype=None) -> Params:
    """Full weights as the decoder reads them under ``compute_dtype``: every matrix cast to it, the norm weights
    kept (the decoder reads them in float32); None or float32: as they are. Leaves already in the dtype are
    returned, not copied."""
    if compute_dtype is None or jnp.dtype(compute_dtype) == jnp.float32:
        return params
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x if "norm" in str(path[-1]) else x.astype(compute_dtype), params)


def merged_params(cfg: TrainConfig, base: Params, trainable: Params) -> Params:
    """The ensemble merged in weight space, as plain weights in the base's dtypes — for export only (HF
    folders): LoRA: ``lora.merge`` by ``cfg.ensemble_merge``; full FT: the one model, cast. Under a bfloat16
    base this rounds (a ΔW below half an ulp of W is lost): sampling, scoring and evaluation use
    ``ensemble_params``."""
    if cfg.lora_rank:
        return lora.merge(base, trainable, cfg.lora_scale, cfg.ensemble_merge)
    return jax.tree.map(lambda x, b: x[0].astype(b.dtype), trainable, base)


def behavior_params(cfg: TrainConfig, state: TrainState, compute_dtype=None) -> Params:
    """π_β: the model that samples in the current phase, as the train step runs the merged ensemble
    (``ensemble_params``) at the phase start, so there π_β = π_θ exactly under every dtype. LoRA: the kept
    merged adapter attached as it is; full FT: the kept weights, already in the compute dtype when
    ``state.behavior`` was taken in it (``behavior_of``), so nothing is copied."""
    if cfg.lora_rank:
        return lora.attach(state.base, state.behavior, 1.0)
    return in_compute_dtype(state.behavior, compute_dtype)


def behavior_of(cfg: TrainConfig | Lora, trainable: Params, compute_dtype=None) -> Params:
    """``state.behavior`` for π_β ← π_θ: LoRA: ``lora.merged_attachment`` of the members (the factors
    ``attach_merged`` would put next to each target; float32, as ``compute_dtype`` does not change them);
    full fine-tuning: the one model as ``ensemble_params`` gives it in ``compute_dtype`` (the model config's
    ``dtype``): matrices cast, norms float32, no ensemble axis. Under jit these are new buffers (the train step
    donates the state)."""
    if cfg.lora_rank:
        return lora.merged_attachment(trainable, cfg.lora_scale, cfg.ensemble_merge)
    return ensemble_params(cfg, None, trainable, compute_dtype)


def behavior_shardings(cfg: TrainConfig | Lora, trainable: Params, base: Params):
    """The shardings ``behavior_of(cfg, trainable)`` takes on the base's mesh: LoRA: ``lora_specs`` of the merged
    rank (its factors have no ensemble axis); full FT: the base's (the same weights' shapes). None when the base
    is not on a mesh."""
    if not isinstance(getattr(jax.tree.leaves(base)[0], "sharding", None), jax.sharding.NamedSharding):
        return None
    if not cfg.lora_rank:
        return jax.tree.map(lambda x: x.sharding, base)
    return lora_shardings(jax.eval_shape(functools.partial(behavior_of, cfg), trainable), base)


def take_behavior(cfg: TrainConfig, trainable: Params, base: Params, compute_dtype=None) -> Params:
    """``behavior_of(cfg, trainable, compute_dtype)`` computed by one program whose outputs are
    ``behavior_shardings``: new buffers (the train step donates the state), born sharded."""
    leaves, treedef = jax.tree.flatten(behavior_shardings(cfg, trainable, base))
    dtype = None if cfg.lora_rank or compute_dtype is None else jnp.dtype(compute_dtype).name
    return _behavior_program(cfg.lora, dtype, treedef, tuple(leaves))(trainable)


def merge_legacy_behavior(cfg: TrainConfig, state: TrainState, compute_dtype=None) -> TrainState:
    """A restored state whose ``behavior`` is shaped like the trainable leaves (a checkpoint written before π_β
    was kept in ``behavior_of``'s form: LoRA members' factors, or full FT's float32 masters with their ensemble
    axis; ``Checkpointer`` restores it as written) with π_β in that form, as it would have been sampled; any
    other state as it is."""
    if state.behavior is None:
        return state
    if jax.tree.map(jnp.shape, state.behavior) != jax.tree.map(jnp.shape, state.trainable):
        return state
    return state.replace(behavior=take_behavior(cfg, state.behavior, state.base, compute_dtype))


@functools.lru_cache(maxsize=16)
def _behavior_program(lora_settings: Lora, compute_dtype: str | None, treedef, leaves):
    """``behavior_of`` jitted once per (LoRA settings, compute dtype, output shardings): F = T takes π_β at every
    step."""
    return jax.jit(functools.partial(behavior_of, lora_settings, compute_dtype=compute_dtype),
                   out_shardings=jax.tree.unflatten(treedef, leaves))


def policy_params(cfg: TrainConfig, state: TrainState, compute_dtype=None) -> Params:
    """π_θ as evaluated: the merged ensemble as the train step runs it (``ensemble_params``). Full FT: that cast
    copy made by one program (``take_behavior``: sharded like the base), so no float32 ``x[0]`` of the whole
    model is made on the way to the compute dtype."""
    if not cfg.lora_rank:
        return take_behavior(cfg, state.trainable, state.base, compute_dtype)
    return ensemble_params(cfg, state.base, state.trainable, compute_dtype)


def export_params(cfg: TrainConfig, state: TrainState) -> Params:
    """π_θ as exported to an HF folder: ``merged_params`` (plain weights in the base's dtypes)."""
    return merged_params(cfg, state.base, state.trainable)


def reference_params(cfg: TrainConfig, state: TrainState) -> Params:
    """The reference inside the DAP loss, per ``cfg.reference``."""
    if cfg.reference == "behavior":
        return behavior_params(cfg, state)
    if cfg.reference == "sft" and state.reference is None:
        return state.base
    if cfg.reference == "fixed":
        return state.reference
    return ensemble_params(cfg, state.base, state.reference)  # ema / mixup


@jax.jit
def _copy(tree):
    # A real copy: the state is donated to the train step, and two leaves must never share a buffer. One compiled
    # program per tree structure, not one eager op per leaf.
    return jax.tree.map(jnp.copy, tree)


def create_state(cfg: TrainConfig, base: Params, key: jax.Array, *, reference: Params | None = None,
                 lora_init: Params | None = None, compute_dtype=None) -> TrainState:
    """A fresh state around ``base`` (already placed on its mesh). LoRA factors are born on the base's mesh,
    sharded by ``lora_specs`` (``lora_init``: the members' starting factors as host arrays,
    ``bpo_jax.models.peft_adapters.read_ensemble``; else a fresh PEFT-style init), and the optimizer state follows
    the trainable leaves' shardings: nothing is made whole on one device and then placed. Trainable leaves are
    float32; π_β is taken in ``compute_dtype`` (the model config's ``dtype``; ``behavior_of``)."""
    init_key, run_key = jax.random.split(key)
    trainable = init_trainable(cfg, base, init_key, lora_init)
    opt_state = _init_opt_state(make_optimizer(cfg), trainable)
    if cfg.reference in ("ema", "mixup") or (cfg.reference == "sft" and cfg.lora_init_from):
        reference = _copy(trainable)
    elif cfg.reference != "fixed":
        reference = None
    elif reference is None:
        raise ValueError("reference=fixed needs the reference weights")
    else:
        want, got = jax.tree.map(jnp.shape, base), jax.tree.map(jnp.shape, reference)
        if want != got:
            raise ValueError("the fixed reference model's weights do not have the policy's architecture (param "
                             "shapes differ); it must be the same model family and size")
    counters = (jnp.int32(0), jnp.int32(0), jax.random.key_data(run_key))
    leaf = jax.tree.leaves(base)[0]
    if isinstance(getattr(leaf, "sharding", None), jax.sharding.NamedSharding):  # replicate them on the mesh
        counters = jax.device_put(counters, jax.sharding.NamedSharding(leaf.sharding.mesh,
                                                                       jax.sharding.PartitionSpec()))
    step, phase, rng = counters
    return TrainState(step=step, phase=phase, rng=rng, base=base, trainable=_copy(trainable),
                      behavior=take_behavior(cfg, trainable, base, compute_dtype), reference=reference,
                      opt_state=opt_state)


def init_trainable(cfg: TrainConfig, base: Params, key: jax.Array, lora_init: Params | None = None) -> Params:
    """The trainable leaves in float32 with a leading ensemble axis. Under LoRA: ``lora_init`` (host arrays of the
    run's shapes, a ValueError otherwise) placed shard by shard, or ``lora.init_lora(key, ...)`` computed by one
    program whose outputs are ``lora_shardings`` (a 5-member r = 256 ensemble of Gemma-2B is 6 GB of float32: made
    on one device and then placed, it would sit there whole). Full fine-tuning: a float32 copy of ``base``,
    sharded like it."""
    if not cfg.lora_rank:
        return jax.jit(lambda b: jax.tree.map(lambda x: x[None].astype(jnp.float32), b))(base)
    layers = {t: jax.ShapeDtypeStruct(base["layers"][t].shape, jnp.float32) for t in cfg.lora_targets}
    init = functools.partial(lora.init_lora, base_layers=layers, targets=cfg.lora_targets, rank=cfg.lora_rank,
                             num_adapters=cfg.ensemble_size)
    want = jax.eval_shape(init, key)
    shardings = lora_shardings(want, base)
    if lora_init is None:
        return jax.jit(init, out_shardings=shardings)(key)
    host = jax.tree.map(lambda x: np.asarray(x, np.float32), lora_init)
    if jax.tree.map(np.shape, host) != jax.tree.map(lambda s: s.shape, want):
        raise ValueError("the starting LoRA factors do not have the run's shapes (targets, rank, members)")
    return jax.device_put(host, shardings)


def _init_opt_state(optimizer, trainable):
    """One optimizer state per ensemble member, made by one program: moments sharded like the leaves they track,
    scalars replicated."""
    init = jax.vmap(optimizer.init)
    leaf = jax.tree.leaves(trainable)[0]
    if not isinstance(getattr(leaf, "sharding", None), jax.sharding.NamedSharding):
        return jax.jit(init)(trainable)
    replicated = jax.sharding.NamedSharding(leaf.sharding.mesh, jax.sharding.PartitionSpec())
    target = optax.tree_map_params(optimizer, lambda _, x: x.sharding, jax.eval_shape(init, trainable), trainable,
                                   transform_non_params=lambda _: replicated,
                                   is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    return jax.jit(init, out_shardings=target)(trainable)


def lora_specs(target_spec, rank: int, mesh) -> tuple:
    """PartitionSpecs of a target's factors ``a [N, L, in, r]`` and ``b [N, L, r, out]``: A's input dim and B's
    output dim sharded like the target's; a factor whose other dim does not use the ``fsdp`` axis has its rank
    dim sharded over ``fsdp`` instead (when it divides), so no factor is replicated across an FSDP mesh (under
    pure FSDP, B of q/k/v/gate/up and A of o/down would otherwise be)."""
    P = jax.sharding.PartitionSpec
    _, s_in, s_out = (tuple(target_spec) + (None, None, None))[:3]
    fsdp = dict(mesh.shape).get("fsdp", 1)

    def uses_fsdp(s):
        return s == "fsdp" or (isinstance(s, tuple) and "fsdp" in s)

    def rank_axis(other):
        return "fsdp" if fsdp > 1 and rank % fsdp == 0 and not uses_fsdp(other) else None

    return P(None, None, s_in, rank_axis(s_in)), P(None, None, rank_axis(s_out), s_out)


def lora_shardings(factors, base) -> dict | None:
    """NamedShardings for LoRA factors (``{target: {"a": [..., in, r], "b": [..., r, out]}}``: arrays or
    ShapeDtypeStructs, the members' ``[N, L, ...]`` or one merged adapter's ``[L, ...]``) on the base's mesh, by
    ``lora_specs`` of their own rank; None when the base is not on a mesh."""
    sharding = getattr(jax.tree.leaves(base)[0], "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return None
    mesh = sharding.mesh

    def named(spec, x):  # lora_specs' [N, L, ...] spec, trimmed to the factor's own dims
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*tuple(spec)[len(spec) - x.ndim:]))

    out = {}
    for name, f in factors.items():
        spec_a, spec_b = lora_specs(base["layers"][name].sharding.spec, f["a"].shape[-1], mesh)
        out[name] = {"a": named(spec_a, f["a"]), "b": named(spec_b, f["b"])}
    return out


def place_like_base(lora_tree, base):
    """Put LoRA factors on the base's mesh (``lora_shardings``); host arrays go shard by shard."""
    shardings = lora_shardings(lora_tree, base)
    return lora_tree if shardings is None else jax.device_put(lora_tree, shardings)


def sync_behavior(cfg: TrainConfig, state: TrainState, compute_dtype=None) -> TrainState:
    """π_β ← π_θ at a phase boundary (``take_behavior`` in ``compute_dtype``: one compiled program, the first
    time)."""
    return state.replace(behavior=take_behavior(cfg, state.trainable, state.base, compute_dtype),
                         phase=_next(state.phase))


@jax.jit
def _next(phase):
    return phase + 1


def committed(state: TrainState) -> TrainState:
    """``state`` with every leaf but the base committed to the sharding it has, as the jitted step's outputs and a
    restored state are: π_β's params then reach the sampler and the checks with the same jit signatures in every
    phase (a fresh state's uncommitted leaves would make phase 2 recompile them)."""
    rest = state.replace(base=None)
    return jax.device_put(rest, shardings(rest)).replace(base=state.base)


def shardings(state: TrainState):
    """The state's current shardings (to jit the train step with explicit in/out shardings)."""
    return jax.tree.map(lambda x: x.sharding, state)
