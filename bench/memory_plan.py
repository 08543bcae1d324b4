"""Per-device memory plan of a BPO training run on a named accelerator and mesh (estimates; nothing allocated).

    python bench/memory_plan.py --config configs/tldr_gemma2b.yaml --model-config configs/models/gemma-2b.json \
        --device v5e-8 [--mesh data=1,fsdp=-1,tensor=1] [--rm-config configs/models/gemma-2b.json] [key=value ...]
    python bench/memory_plan.py --config configs/tldr_gemma2b.yaml --all [--rm-config ...]
    python bench/memory_plan.py --config configs/tldr_gemma2b.yaml --hosts   # the mesh each slice gets

Parameter and state shapes and dtypes come from the project's code under ``jax.eval_shape``
(``decoder.init_params``, ``state.create_state``, ``decoder.init_cache``); per-device shard shapes come from
``NamedSharding(AbstractMesh, spec).shard_shape`` with the project's specs (``sharding.logical_to_specs``,
``sharding.cache_shardings``, the LoRA/optimizer placement of ``state.py``). Activation, gradient and
temporary terms are closed-form estimates (docs/scaling.md states them). The sampling terms follow the config's
``sampling_layout`` (``auto`` decides from the device's HBM as ``sampler.for_sampling`` does from its memory):
in the sampling layout they add π_β's replicated copy (``sampler.sampling_shardings``).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AbstractMesh, AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from bpo_jax.config import load_config  # noqa: E402
from bpo_jax.models import decoder  # noqa: E402
from bpo_jax.models.config import ModelConfig  # noqa: E402
from bpo_jax.runtime import distributed  # noqa: E402
from bpo_jax.runtime import sharding as shd  # noqa: E402
from bpo_jax.sample import sampler  # noqa: E402
from bpo_jax.train import state as st  # noqa: E402

GiB = 2**30
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name -> (description, chips (= JAX devices), HBM GiB per chip). The "-8" of v4-8 / v5p-8 counts TensorCores
# (2 per chip, one JAX device per chip); the "-8" / "-32" of v5e counts chips (1 TensorCore each).
DEVICES = {
    "v4-8": ("TPU v4, 4 chips", 4, 32),
    "v5e-8": ("TPU v5e, 8 chips", 8, 16),
    "v5p-8": ("TPU v5p, 4 chips", 4, 95),
    "v5e-32": ("TPU v5e, 32 chips (8 hosts)", 32, 16),
    "v5p-128": ("TPU v5p, 64 chips (16 hosts)", 64, 95),
    "h100": ("NVIDIA H100 80GB, 1 GPU", 1, 80),
}
HOSTS = {"v4-8": 1, "v5e-8": 1, "v5p-8": 1, "v5e-32": 8, "v5p-128": 16, "h100": 1}  # JAX processes (hosts) per slice
TIGHT = 0.10  # headroom below this fraction of HBM is reported as tight


def parse_mesh(text: str | None, chips: int, cfg) -> dict:
    sizes = {"data": cfg.mesh_data, "fsdp": cfg.mesh_fsdp, "tensor": cfg.mesh_tensor}
    for item in (text or "").split(","):
        if item.strip():
            k, v = item.split("=")
            if k.strip() not in sizes:
                raise SystemExit(f"unknown mesh axis {k!r}; axes: {', '.join(shd.MESH_AXES)}")
            sizes[k.strip()] = int(v)
    free = [k for k, v in sizes.items() if v == -1]
    known = math.prod(v for v in sizes.values() if v != -1)
    if len(free) > 1 or (free and chips % known):
        raise SystemExit(f"mesh {sizes} cannot be laid out on {chips} chips")
    if free:
        sizes[free[0]] = chips // known
    if math.prod(sizes.values()) != chips:
        raise SystemExit(f"mesh {sizes} needs {math.prod(sizes.values())} chips; the device has {chips}")
    return sizes


def abstract_mesh(sizes: dict) -> AbstractMesh:
    return AbstractMesh(tuple(sizes[a] for a in shd.MESH_AXES), shd.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def model_config(path: str, cfg) -> ModelConfig:
    with open(path) as f:
        hf = json.load(f)
    dtype = "bfloat16" if cfg.dtype == "auto" else cfg.dtype  # auto = bfloat16 on accelerators
    return ModelConfig.from_hf(hf, param_dtype=cfg.param_dtype, dtype=dtype, remat=cfg.remat, attention=cfg.attention)


def shard_bytes(leaf, sharding, itemsize: int | None = None) -> int:
    """Bytes of one device's shard of ``leaf`` (a ShapeDtypeStruct) under ``sharding``."""
    size = itemsize or jnp.dtype(leaf.dtype).itemsize
    return math.prod(sharding.shard_shape(leaf.shape)) * size


def tree_bytes(tree, shardings) -> int:
    """Per-device bytes of a pytree under matching shardings."""
    leaves = jax.tree.leaves(tree)
    shs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    assert len(leaves) == len(shs), (len(leaves), len(shs))
    return sum(shard_bytes(x, s) for x, s in zip(leaves, shs))


def abstract_state(cfg, mc: ModelConfig):
    """(base, state) as ShapeDtypeStructs from the real ``init_params`` / ``create_state``."""
    base = jax.eval_shape(functools.partial(decoder.init_params, mc), jax.random.key(0))
    ref = base if cfg.reference == "fixed" else None
    state = jax.eval_shape(functools.partial(st.create_state, cfg, reference=ref, compute_dtype=mc.dtype), base,
                           jax.random.key(0))
    return base, state


def state_shardings(cfg, mc: ModelConfig, state, mesh):
    """Shardings of the state's leaves as ``state.create_state`` places them on a mesh."""
    ns = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
    base_specs = shd.logical_to_specs(decoder.param_axes(mc), state.base, mesh)
    is_p = lambda x: isinstance(x, P)  # noqa: E731
    base = jax.tree.map(ns, base_specs, is_leaf=is_p)
    if cfg.lora_rank:  # state.lora_specs, as state.lora_shardings places them; π_β merged: no ensemble axis
        trainable, behavior = {}, {}
        for name in state.trainable:
            spec_a, spec_b = st.lora_specs(base_specs["layers"][name], cfg.lora_rank, mesh)
            trainable[name] = {"a": ns(spec_a), "b": ns(spec_b)}
            merged_rank = state.behavior[name]["a"].shape[-1]
            spec_a, spec_b = st.lora_specs(base_specs["layers"][name], merged_rank, mesh)
            behavior[name] = {"a": ns(P(*spec_a[1:])), "b": ns(P(*spec_b[1:]))}
    else:  # x[None]: a leading ensemble axis, replicated; π_β: the one model, sharded like the base
        trainable = jax.tree.map(lambda s: ns(P(None, *s)), base_specs, is_leaf=is_p)
        behavior = base
    opt = optax.tree_map_params(st.make_optimizer(cfg), lambda _, s: s, state.opt_state, trainable,
                                transform_non_params=lambda _: ns(P()),
                                is_leaf=lambda x: isinstance(x, NamedSharding))
    ref = {"ema": trainable, "mixup": trainable, "fixed": base}.get(cfg.reference)
    return base, trainable, behavior, opt, ref


def working_set(mc: ModelConfig, rows: int, t: int, tensor: int) -> int:
    """Estimated bytes one decoder layer keeps for its backward (or holds live in a forward) for ``rows``
    sequences of ``t`` tokens; head/MLP dims split over ``tensor`` where they divide."""
    c = jnp.dtype(mc.dtype).itemsize
    split = lambda n: n // tensor if n % tensor == 0 else n  # noqa: E731
    heads, q, kv, mlp = split(mc.num_heads), split(mc.q_size), split(mc.kv_size), split(mc.intermediate_size)
    d = mc.hidden_size
    per_row = (t * d * (2 * 4 + 4 * c)  # two f32 RMSNorm upcasts; normed inputs, residuals
               + t * (q + 2 * kv) * c  # q, k, v
               + t * (q + kv) * 4  # RoPE's f32 halves of q and k
               + t * q * c  # attention output
               # scores (f32) and probabilities; cuDNN's fused attention keeps only each row's softmax statistics
               + (heads * t * 4 if mc.attention == "cudnn" else heads * t * t * (4 + c))
               + 4 * t * mlp * c)  # gate, activation, up, activation·up
    return rows * per_row


def _layer_cast_bytes(layers: dict, shardings: dict, num_layers: int, itemsize: int) -> int:
    """One layer's share of the stacked layer leaves, per device, at ``itemsize`` bytes an element."""
    return sum(shard_bytes(layers[k], shardings[k], itemsize) for k in layers) // num_layers


def _decode_weights(cfg, mc: ModelConfig, mesh, params, train_unstacked: int, free: int):
    """A decoding model's weights as ``sampler.for_sampling`` places them (``sampling_layout``; auto deciding from
    the memory left ``free``, as the run does from the device's) and their ``unstack_layers`` copy: ``(layout,
    the sampling layout's copy, what stays alive through the call, the unstacked bytes)``. The sampling layout
    copies the weights replicated over data x fsdp, split over tensor, and unstacks that copy (its layers twice
    while unstacking; the copy's own are freed after); the train layout unstacks the weights where they are
    (``train_unstacked``). With fsdp = 1 the two layouts are one."""
    shardings = sampler.sampling_shardings(mc, mesh, params=params)
    copy = tree_bytes(params, shardings)
    layout = "train" if mesh.shape["fsdp"] == 1 else sampler.choose_layout(cfg.sampling_layout, copy, free)
    if layout == "replicated":
        return layout, copy, {"sampling_copy": copy}, tree_bytes(params["layers"], shardings["layers"])
    return layout, copy, {}, train_unstacked


def _call_rows(per_host: int, shards: int, hosts: int) -> int:
    """Global prompt rows of one ``generate`` call in which each of ``hosts`` hosts passes ``per_host`` prompts:
    each pads its rows up to its batch shards times a power of two (``sampler._rows_bucket``)."""
    return sampler._rows_bucket(max(1, per_host), max(1, shards // hosts)) * hosts


def _kv_and_prefill(mc: ModelConfig, mesh, prompts: int, samples: int, prompt_len: int, new_tokens: int) -> tuple:
    """``(KV cache, prefill)`` bytes per device of one ``generate`` call over ``prompts`` rows (global) with
    ``samples`` samples each: the cache of prompts·samples rows × (prompt_len + new_tokens) slots; the prefill's
    prompt cache and one layer's working set over the prompts."""
    cache = jax.eval_shape(lambda: decoder.init_cache(mc, samples * prompts, prompt_len + new_tokens,
                                                      per_layer=True))
    prompt_cache = jax.eval_shape(lambda: decoder.init_cache(mc, prompts, prompt_len, per_layer=True))
    rows = max(1, prompts // shd.batch_shards(mesh))
    return (tree_bytes(cache, shd.cache_shardings(cache, mesh)),
            tree_bytes(prompt_cache, shd.cache_shardings(prompt_cache, mesh))
            + working_set(mc, rows, prompt_len, mesh.shape["tensor"]))


def plan(cfg, mc: ModelConfig, mesh_sizes: dict, hbm_gib: float, rm: ModelConfig | None = None,
         hosts: int = 1) -> dict:
    """Per-device bytes of every component, the per-phase transients and the peak (``hosts``: the JAX processes
    of the slice, each evaluating its own ``eval_batch_size`` prompts at a time)."""
    mesh = abstract_mesh(mesh_sizes)
    base, state = abstract_state(cfg, mc)
    shardings = state_shardings(cfg, mc, state, mesh)
    sh_base, sh_train, sh_beh, sh_opt, sh_ref = shardings
    tensor, s = mesh_sizes["tensor"], shd.batch_shards(mesh)
    dtype_of = lambda tree: str(jax.tree.leaves(tree)[0].dtype) if tree is not None else "-"  # noqa: E731
    r = {"mesh": mesh_sizes, "hbm": hbm_gib * GiB,
         "trainable_dtype": dtype_of(state.trainable), "opt_dtype": dtype_of(state.opt_state[1][0].mu),
         "behavior_dtype": dtype_of(state.behavior), "reference_dtype": dtype_of(state.reference),
         "trainable_count": sum(x.size for x in jax.tree.leaves(state.trainable)),
         "base_count": sum(x.size for x in jax.tree.leaves(base))}
    # Resident: the state as create_state builds it (trainable, behavior, ema/mixup reference and the AdamW
    # moments float32 masters; base and a fixed reference in param_dtype).
    res = {"base": tree_bytes(state.base, sh_base)}
    for key, tree, shs in (("trainable", state.trainable, sh_train), ("opt_state", state.opt_state, sh_opt),
                           ("behavior", state.behavior, sh_beh), ("reference", state.reference, sh_ref)):
        res[key] = tree_bytes(tree, shs) if tree is not None else 0
    if rm is not None:  # reward model: the decoder without lm_head, plus a replicated score vector [D]
        rm_base = jax.eval_shape(functools.partial(decoder.init_params, rm), jax.random.key(0))
        rm_base.pop("lm_head", None)
        axes = decoder.param_axes(rm)
        axes.pop("lm_head", None)
        specs = shd.logical_to_specs(axes, rm_base, mesh)
        rm_sh = jax.tree.map(lambda p: NamedSharding(mesh, p), specs, is_leaf=lambda x: isinstance(x, P))
        res["reward_model"] = tree_bytes(rm_base, rm_sh) + rm.hidden_size * 4
    layer_leaves = lambda: sum(  # noqa: E731
        tree_bytes(state.base["layers"][k], sh_base["layers"][k]) for k in state.base["layers"])

    # Sampling (collect_pairs): π_β as the train step runs it (state.behavior_params, with no copy: LoRA's merged
    # adapter kept as attach puts it; full FT's one model kept in the compute dtype, norms float32), its
    # unstack_layers copy, the KV cache of bprompts·2 rows and the prefill's prompt cache. A call samples up to
    # sampling_batch_size prompts (whole batches, no more than the phase's K·B: loop.collect_pairs).
    if cfg.lora_rank:
        unstacked = layer_leaves() + res["behavior"]
    else:
        unstacked = tree_bytes(state.behavior["layers"], sh_beh["layers"])
    # In the sampling layout π_β is copied and the unstacked copy made of that copy (_decode_weights).
    beh = jax.eval_shape(lambda s: st.behavior_params(cfg, s, mc.dtype), state)
    free = hbm_gib * GiB - sum(res.values())  # what the run's state leaves free when a phase starts
    train_unstacked = unstacked
    layout, copy, held, unstacked = _decode_weights(cfg, mc, mesh, beh, unstacked, free)  # held: until annotated
    r.update(sampling_layout=layout, sampling_copy=copy)
    calls = min(max(1, (cfg.sampling_batch_size or cfg.batch_size) // cfg.batch_size), cfg.steps_per_phase)
    bprompts = _call_rows(calls * cfg.batch_size // hosts, s, hosts)
    plen = sampler._bucket(cfg.max_prompt_length, 32)
    kv, prefill = _kv_and_prefill(mc, mesh, bprompts, 2, plen, cfg.max_new_tokens)
    samp = {**held, "behavior_unstacked": unstacked, "kv_cache": kv, "prefill": prefill}
    r.update(kv_rows=2 * bprompts, kv_len=plen + cfg.max_new_tokens)

    # Annotation: the unstacked behavior weights (or the sampling copy) stay alive while the reward model scores.
    ann = {}
    if rm is not None:
        rows = cfg.reward_batch_size // s if cfg.reward_batch_size % s == 0 else cfg.reward_batch_size
        t = cfg.reward_max_length
        hidden = rows * t * rm.hidden_size * jnp.dtype(rm.dtype).itemsize
        alive = held or {"behavior_unstacked": unstacked}  # the sampling copy is the unstacked one by then
        ann = {**alive, "rm_forward": hidden + working_set(rm, rows, t, tensor)}

    evaluation, eval_steps = _evaluation(cfg, mc, mesh, state, res, train_unstacked, free, hosts, plen,
                                         ann.get("rm_forward"))

    train, ref_fwd, rows, t = _train_and_reference(cfg, mc, mesh, base, state, res, shardings)
    r.update(train_rows=rows, train_len=t)

    phases = {"sampling": sum(samp.values()), "annotation": sum(ann.values()), "train_step": sum(train.values()),
              "reference_forward": sum(ref_fwd.values()),
              "evaluation": sum(evaluation.values()) + max(eval_steps.values())}
    worst = max(phases, key=phases.get)
    r.update(resident=res, sampling=samp, annotation=ann, train=train, reference_forward=ref_fwd,
             evaluation=evaluation, eval_steps=eval_steps, phases=phases, peak_phase=worst,
             peak=sum(res.values()) + phases[worst])
    return r


def _train_and_reference(cfg, mc: ModelConfig, mesh, base, state, res: dict, shardings) -> tuple:
    """The train step's transients and the reference forward's (``reference`` ≠ ``behavior``), and the train rows
    and tokens per device: ``(train, ref_fwd, rows, t)``."""
    sh_base, sh_train, _, _, sh_ref = shardings
    n, tensor, s = cfg.ensemble_size, mesh.shape["tensor"], shd.batch_shards(mesh)
    c = jnp.dtype(mc.dtype).itemsize
    # Train step, per micro-batch of B/m pairs, split over data×fsdp when they divide: B/m rows of P + 2N tokens
    # ([prompt | chosen | rejected], share_prompt) or 2·B/m rows of P + N.
    pairs = cfg.batch_size // cfg.micro_batches
    seqs = 2 * (pairs // s if pairs % s == 0 else pairs)  # chosen and rejected sequences
    if cfg.share_prompt:
        rows, t = seqs // 2, cfg.max_prompt_length + 2 * cfg.max_new_tokens
    else:
        rows, t = seqs, cfg.max_prompt_length + cfg.max_new_tokens
    ws = working_set(mc, rows, t, tensor)
    if mc.remat == "full":  # each layer's input kept; one layer recomputed at a time
        act = mc.num_layers * rows * t * mc.hidden_size * c + 2 * ws
    elif mc.remat == "dots":  # its input and matmul outputs (q, k, v, o, gate, up, down) kept per layer
        split = (mc.q_size + 2 * mc.kv_size + 2 * mc.intermediate_size) // tensor  # column-parallel outputs
        act = mc.num_layers * rows * t * (3 * mc.hidden_size + split) * c + 2 * ws  # + input, o and down outputs
    else:
        act = (mc.num_layers + 1) * ws
    vocab = mc.vocab_size // tensor if mc.vocab_size % tensor == 0 else mc.vocab_size
    positions = min(cfg.logprob_chunk, cfg.max_new_tokens) if cfg.logprob_chunk else cfg.max_new_tokens
    logits = 2 * seqs * positions * vocab * 4  # f32 logits + the softmax in their backward (one chunk at a time)
    # LoRA in activation space (decoder._linear): x A [rows, T, r] in the compute dtype per target per layer,
    # saved for the backward without remat (L + 1 layers' worth, like W), else one recomputed layer's value and
    # cotangent.
    xa_layers = 2 if mc.remat == "full" else mc.num_layers + 1
    xa_one = rows * t * c * len(cfg.lora_targets) if cfg.lora_rank else 0  # per unit of rank, per layer

    def casts(tree, shs) -> int:
        """The compute-dtype copies the forward makes of weights stored in another dtype: the unembedding
        (logits_from_hidden casts embed.T / lm_head whole) and one layer's weights inside the scan."""
        if jax.tree.leaves(tree)[0].dtype == jnp.dtype(mc.dtype):
            return 0
        un = "embed" if mc.tie_word_embeddings else "lm_head"
        lead = tree[un].ndim - base[un].ndim  # full FT: the x[0] of an [N, ...] leaf
        one = lambda x: jax.ShapeDtypeStruct(x.shape[lead:], x.dtype)  # noqa: E731
        sh_one = lambda z: NamedSharding(mesh, P(*z.spec[lead:]))  # noqa: E731
        lay = {k: one(v) for k, v in tree["layers"].items()}
        lay_sh = {k: sh_one(v) for k, v in shs["layers"].items()}
        return shard_bytes(one(tree[un]), sh_one(shs[un]), c) + _layer_cast_bytes(lay, lay_sh, mc.num_layers, c)

    train = {"grads_and_update": 3 * res["trainable"] // n}  # float32 accumulator, one micro-batch's grads, update
    if cfg.lora_rank:  # what the scan reads: lax.map's slice of one member's A and attach's s·B, float32
        train["member_factors"] = res["trainable"] // n
        train["lora_xa"] = xa_layers * xa_one * cfg.lora_rank
        fwd_weights, fwd_sh = state.base, sh_base
    else:  # adapter_params = the float32 master itself
        fwd_weights, fwd_sh = state.trainable, sh_train
    if (wc := casts(fwd_weights, fwd_sh)):
        train["weight_casts"] = wc
    train["activations"] = act
    train["logits"] = logits

    # Reference forward (reference != behavior): runs before the gradient pass, outside it, so it is a phase of
    # its own. ema/mixup under LoRA: the reference factors merged by ensemble_merge (lora.attach_merged, float32):
    # mean_delta's rank-N·r concatenation (the reference's bytes), peft_linear's rank-r sums (1/N of them).
    ref_fwd = {}
    if cfg.reference != "behavior":
        if cfg.lora_rank and cfg.reference in ("ema", "mixup"):
            ref_fwd["reference_factors"] = res["reference"] // (n if cfg.ensemble_merge == "peft_linear" else 1)
        ref_tree, ref_sh = {"fixed": (state.reference, sh_ref)}.get(cfg.reference, (state.base, sh_base))
        if cfg.reference in ("ema", "mixup") and not cfg.lora_rank:
            ref_tree, ref_sh = state.reference, sh_ref
        if (wc := casts(ref_tree, ref_sh)):
            ref_fwd["weight_casts"] = wc
        ref_fwd["forward"] = rows * t * mc.hidden_size * c + ws + xa_one * n * cfg.lora_rank
        ref_fwd["logits"] = logits

    return train, ref_fwd, rows, t


def _evaluation(cfg, mc: ModelConfig, mesh, state, res: dict, train_unstacked: int, free: int, hosts: int,
                prompt_len: int, rm_forward: int | None) -> tuple[dict, dict]:
    """The evaluation (``score_task``: at step 0, every ``eval_every`` steps, at the end): ``(what is alive
    throughout, the steps that run one after another with it)``. π_θ as evaluated (``state.policy_params``: made
    anew, with π_β's kept shapes: LoRA's merged factors, full FT's masters cast to the compute dtype) is placed
    and unstacked as π_β is to sample (``_decode_weights``, from the memory left beside it; in the sampling
    layout the stacked copy is freed once unstacked, so it adds its layers a second time only while unstacking),
    then each host greedy-decodes ``eval_batch_size`` prompts at a time; with those weights alive, the SFT
    log-ratio forward (``eval_sft_logratio``; its SFT model's merged factors not counted) and the reward model's
    scoring follow."""
    pol = jax.eval_shape(lambda s: st.policy_params(cfg, s, mc.dtype), state)
    _, copy, held, unstacked = _decode_weights(cfg, mc, mesh, pol, train_unstacked, free - res["behavior"])
    s = shd.batch_shards(mesh)
    prompts = _call_rows(cfg.eval_batch_size, s, hosts)
    kv, prefill = _kv_and_prefill(mc, mesh, prompts, 1, prompt_len, cfg.eval_max_new_tokens)
    steps = {"unstacking": unstacked} if held else {}
    steps["decode"] = kv + prefill
    if cfg.eval_sft_logratio:  # response_logps: one forward, unembedding 16 positions at a time
        rows, t = max(1, prompts // s), prompt_len + cfg.eval_max_new_tokens
        c = jnp.dtype(mc.dtype).itemsize
        steps["sft_logratio"] = (rows * t * mc.hidden_size * c + working_set(mc, rows, t, mesh.shape["tensor"])
                                 + rows * 16 * mc.vocab_size * 4)
    if rm_forward is not None:
        steps["rm_scoring"] = rm_forward
    return {"policy": res["behavior"], "policy_unstacked": copy if held else unstacked}, steps


def verdict(peak: float, hbm: float) -> str:
    head = hbm - peak
    if head < 0:
        return f"does NOT fit (over by {-head / GiB:.1f} GiB)"
    return f"fits{' (tight)' if head < TIGHT * hbm else ''}, headroom {head / GiB:.1f} GiB ({head / hbm:.0%})"


def print_plan(r: dict, cfg, mc: ModelConfig, device: str) -> None:
    g = lambda b: f"{b / GiB:8.2f}"  # noqa: E731
    desc, chips, hbm = DEVICES[device]
    m = r["mesh"]
    print(f"device {device}: {desc}, {hbm} GiB HBM per chip | mesh data={m['data']} fsdp={m['fsdp']} "
          f"tensor={m['tensor']}")
    print(f"model {mc.model_type} {r['base_count'] / 1e9:.2f}B params, param_dtype={mc.param_dtype}, "
          f"compute={mc.dtype}, remat={mc.remat}{', attention=cudnn' if mc.attention == 'cudnn' else ''} | "
          f"lora_rank={cfg.lora_rank} ensemble={cfg.ensemble_size} "
          f"reference={cfg.reference} | trainable {r['trainable_count'] / 1e6:.1f}M params")
    print(f"batch {cfg.batch_size} pairs / {cfg.micro_batches} micro-batches -> {r['train_rows']} rows x "
          f"{r['train_len']} tokens per device; KV cache {r['kv_rows']} rows x {r['kv_len']} slots (global)")
    print(f"pi_beta samples in the {r['sampling_layout']} layout (sampling_layout={cfg.sampling_layout}; the "
          f"sampling layout's copy: {r['sampling_copy'] / GiB:.2f} GiB per device)")
    print(f"{'per device':34s}{'GiB':>8s}")
    labels = {"base": f"base ({mc.param_dtype})", "trainable": f"trainable ({r['trainable_dtype']})",
              "opt_state": f"AdamW mu+nu ({r['opt_dtype']})", "behavior": f"behavior ({r['behavior_dtype']})",
              "reference": f"reference ({r['reference_dtype']})"}
    for k, v in r["resident"].items():
        print(f"  {labels.get(k, k):32s}{g(v)}")
    print(f"  {'= resident':32s}{g(sum(r['resident'].values()))}")
    for phase, items in (("evaluation", r["evaluation"]), ("eval (one of)", r["eval_steps"]),  # a run's order
                         ("sampling", r["sampling"]), ("annotation", r["annotation"]),
                         ("ref_forward", r["reference_forward"]), ("train_step", r["train"])):
        for k, v in items.items():
            print(f"  {phase + ': ' + k:32s}{g(v)}")
    print(f"  {'= peak (' + r['peak_phase'] + ')':32s}{g(r['peak'])}")
    print(f"HBM {hbm} GiB: {verdict(r['peak'], hbm * GiB)}")


CASES = (  # name, model config, overrides on top of the training config
    ("gemma-2b 5xLoRA r256", "gemma-2b.json", ()),
    ("gemma-2b full FT", "gemma-2b.json", ("lora_rank=0", "ensemble_size=1")),
    ("llama-2-7b 5xLoRA r256", "llama-2-7b.json", ()),
    ("llama-2-7b full FT", "llama-2-7b.json", ("lora_rank=0", "ensemble_size=1")),
)
ALL_MESHES = {"v5e-32": "data=1,fsdp=16,tensor=2"}  # else FSDP over all chips
# More shapes for the multi-host layout table (--hosts), among them one that is refused.
HOST_MESHES = {"v5e-32": ("data=1,fsdp=8,tensor=4", "data=2,fsdp=8,tensor=2", "data=1,fsdp=4,tensor=8")}


def print_all(config_path: str, overrides, rm: str | None) -> None:
    cols = ("case", "device", "mesh d/f/t", "base", "train+opt", "beh+ref", "RM", "sampling", "train_step",
            "eval", "peak", "HBM", "verdict")
    print(" | ".join(cols))
    for name, model, extra in CASES:
        cfg = load_config(config_path, list(extra) + list(overrides))
        mc = model_config(os.path.join(ROOT, "configs", "models", model), cfg)
        rmc = model_config(rm, cfg) if rm else None
        for device, (_, chips, hbm) in DEVICES.items():
            sizes = parse_mesh(ALL_MESHES.get(device, "data=1,fsdp=-1,tensor=1"), chips, cfg)
            r = plan(cfg, mc, sizes, hbm, rmc, HOSTS[device])
            res = r["resident"]
            g = lambda b: f"{b / GiB:.2f}"  # noqa: E731
            row = (name, device, "/".join(str(v) for v in sizes.values()), g(res["base"]),
                   g(res["trainable"] + res["opt_state"]), g(res["behavior"] + res["reference"]),
                   g(res.get("reward_model", 0)), g(r["phases"]["sampling"]), g(r["phases"]["train_step"]),
                   g(r["phases"]["evaluation"]), g(r["peak"]), str(hbm), verdict(r["peak"], hbm * GiB))
            print(" | ".join(row))


class _Chip:
    """A stand-in device for the layout code: an id and its host."""

    platform = device_kind = "cpu"

    def __init__(self, i: int, host: int):
        self.id, self.process_index = i, host


def host_layout(sizes: dict, chips: int, hosts: int) -> str:
    """What ``distributed.make_mesh`` builds for ``sizes`` on ``hosts`` hosts of ``chips / hosts`` chips: the
    hosts' grid over the batch axes and each host's block, or why the shape is refused."""
    if hosts == 1:
        return "one host: every axis inside it"
    devices = [_Chip(h * 1000 + i, h) for h in range(hosts) for i in range(chips // hosts)]
    arranged = distributed.host_aware_devices(tuple(sizes.values()), devices)
    if arranged is None:
        return (f"refused: tensor={sizes['tensor']} does not fit inside a host's {chips // hosts} chips "
                f"(or the hosts do not split over data x fsdp)")
    d, f, t = arranged.shape
    dd = len({arranged[i, 0, 0].process_index for i in range(d)})
    df = len({arranged[0, j, 0].process_index for j in range(f)})
    return (f"hosts form data {dd} x fsdp {df}; each host holds data {d // dd} x fsdp {f // df} x tensor {t}: "
            f"tensor inside a host, {d * f // hosts} batch shard(s) per host")


def print_hosts(config_path: str, overrides) -> None:
    cfg = load_config(config_path, list(overrides))
    print("device | hosts x chips | mesh d/f/t | layout")
    for device, (_, chips, _) in DEVICES.items():
        for mesh in dict.fromkeys([ALL_MESHES.get(device, "data=1,fsdp=-1,tensor=1"), *HOST_MESHES.get(device, ())]):
            sizes = parse_mesh(mesh, chips, cfg)
            print(f"{device} | {HOSTS[device]} x {chips // HOSTS[device]} | {'/'.join(map(str, sizes.values()))} | "
                  f"{host_layout(sizes, chips, HOSTS[device])}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--model-config", help="an HF config.json (the config's `model` folder is not needed)")
    ap.add_argument("--device", choices=sorted(DEVICES))
    ap.add_argument("--mesh", help="e.g. data=1,fsdp=-1,tensor=1 (default: the config's mesh_* keys)")
    ap.add_argument("--rm-config", help="HF config.json of a decoder reward model held on the same mesh")
    ap.add_argument("--all", action="store_true", help="the table for docs/scaling.md")
    ap.add_argument("--hosts", action="store_true", help="the mesh layout over hosts of each slice")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    a = ap.parse_args(argv)
    if a.all:
        return print_all(a.config, a.overrides, a.rm_config)
    if a.hosts:
        return print_hosts(a.config, a.overrides)
    if not (a.model_config and a.device):
        ap.error("--model-config and --device are needed (or --all)")
    cfg = load_config(a.config, a.overrides)
    mc = model_config(a.model_config, cfg)
    _, chips, hbm = DEVICES[a.device]
    r = plan(cfg, mc, parse_mesh(a.mesh, chips, cfg), hbm, model_config(a.rm_config, cfg) if a.rm_config else None,
             HOSTS[a.device])
    print_plan(r, cfg, mc, a.device)


if __name__ == "__main__":
    main()
