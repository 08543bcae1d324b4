"""LoRA ensembles as plain pytrees: float32 master factors, applied in activation space or merged in weights.

An ensemble of N adapters on a set of target matrices: for a target ``W [layers, in, out]`` each adapter has
``A [N, layers, in, r]`` and ``B [N, layers, r, out]`` with ``ΔW_i = s · A_i B_i``, ``s = α / r``. A fresh adapter
is initialised as PEFT does (``init_lora_weights=True``): ``B = 0``, so every adapter starts at the base model,
and ``A`` Kaiming-uniform with ``a = √5`` over its ``in`` fan-in, i.e. ``U(−1/√in, 1/√in)``, with its own seed per
adapter; or the ensemble starts from PEFT adapter folders (``bpo_jax.models.peft_adapters``). The factors are float32
whatever the base's dtype: they are the optimizer's master weights.

Training applies an adapter in activation space, as PEFT does: ``attach`` puts the factors next to each target
(``layers["<target>_lora"] = {"a": A, "b": s·B}``) and the decoder computes ``y = x W + (x A)(s B)``, summed in
float32 and rounded once (``decoder._linear``). No weight-sized copy is built, and a ``ΔW`` below half an ulp
of ``W`` still reaches the output, which adding it to a bfloat16 ``W`` would round away.

The merged ensemble — BPO's behavior LLM π_β, the ``ema``/``mixup`` reference, the evaluated model and the
exported ``merged`` adapter — follows ``ensemble_merge`` (``merged_adapter``), always as ONE adapter applied in
activation space (``attach_merged``), so π_β is exactly the π_θ the train step runs, whatever the dtypes:

  * ``mean_delta`` (default): the base plus the *mean of the adapters' weight deltas*, ``W + (1/N) Σ_i ΔW_i``:
    one adapter of rank N·r (exact), ``(1/N) Σ_i A_i B_i = [A_1 … A_N][B_1; …; B_N] / N``, scale ``s/N``.
  * ``peft_linear``: what PEFT's ``LoraModel.add_weighted_adapter(adapters, weights=[1/N]*N,
    combination_type="linear")`` builds (``_generalized_task_arithmetic_weighted_adapter``), which the paper's
    authors used (xu1998hz/BPO ``train/online_dpo_rand_trainer.py``): with ``w_i = 1/N`` and each adapter's
    scaling ``s``, ``A' = Σ_i √(w_i·s)·A_i``, ``B' = Σ_i √(w_i·s)·B_i``, a rank-r adapter whose config gets
    ``r = lora_alpha = r`` (scale 1). Its delta ``A'B' = (s/N)(Σ_i A_i)(Σ_j B_j)`` holds the cross terms
    ``A_i B_j`` (i ≠ j): it is not the mean of the deltas (equal to it for N = 1).

``merge`` materialises a merged adapter into the weights (float32 sum, cast to W's dtype): only for export as
plain HF weights, since a ``ΔW`` below half an ulp of a bfloat16 ``W`` rounds away there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Target names: ours and the HF module names users know.
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
MERGE_RULES = ("mean_delta", "peft_linear")
_HF_NAMES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
             "down_proj": "down"}


def canonical_targets(targets) -> tuple[str, ...]:
    """Map HF module names (``q_proj``) to ours (``q``); raise ValueError on unknown names."""
    out = []
    for t in targets:
        name = _HF_NAMES.get(t, t)
        if name not in TARGETS:
            raise ValueError(f"unknown LoRA target {t!r}; valid: {', '.join(TARGETS)} (or their HF *_proj names)")
        out.append(name)
    return tuple(dict.fromkeys(out))


def init_lora(key, base_layers: dict, *, targets, rank: int, num_adapters: int) -> dict:
    """``{target: {"a": [N, L, in, r], "b": [N, L, r, out]}}`` in float32, as PEFT initialises a LoRA layer
    (``nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))`` on the ``[r, in]`` weight: bound
    ``gain·√(3/in)`` with ``gain = √(2/(1+a²))``, i.e. ``U(−1/√in, 1/√in)``), B = 0."""
    lora = {}
    for i, name in enumerate(targets):
        n_layers, d_in, d_out = base_layers[name].shape
        k = jax.random.fold_in(key, i)
        bound = 1.0 / jnp.sqrt(d_in)
        a = jax.random.uniform(k, (num_adapters, n_layers, d_in, rank), jnp.float32, -bound, bound)
        lora[name] = {"a": a, "b": jnp.zeros((num_adapters, n_layers, rank, d_out), jnp.float32)}
    return lora


def lora_axes(base_axes: dict, targets) -> dict:
    """Logical axes of the LoRA factors, from the targets' own axes."""
    out = {}
    for name in targets:
        layers, ax_in, ax_out = base_axes["layers"][name]
        out[name] = {"a": ("ensemble", layers, ax_in, "lora_rank"), "b": ("ensemble", layers, "lora_rank", ax_out)}
    return out


def attach(base: dict, lora_i: dict, scale: float) -> dict:
    """The params of a single adapter in activation space (``lora_i`` has no N axis): ``base`` with
    ``layers["<target>_lora"] = {"a": A [L, in, r], "b": scale·B [L, r, out]}``; the decoder adds ``(x A)(s B)``
    to ``x W``. Gradients reach the factors through it."""
    layers = dict(base["layers"])
    for name, f in lora_i.items():
        b = f["b"] if isinstance(scale, (int, float)) and scale == 1 else scale * f["b"]  # 1: no copy
        layers[f"{name}_lora"] = {"a": f["a"], "b": b}
    return {**base, "layers": layers}


def concat(lora: dict) -> dict:
    """The N adapters stacked along the rank axis, one adapter of rank N·r: ``a [L, in, N·r] = [A_1 … A_N]``,
    ``b [L, N·r, out] = [B_1; …; B_N]``, so ``a b = Σ_i A_i B_i``."""
    out = {}
    for name, f in lora.items():
        n, layers, d_in, r = f["a"].shape
        d_out = f["b"].shape[-1]
        out[name] = {"a": jnp.moveaxis(f["a"], 0, 2).reshape(layers, d_in, n * r),
                     "b": jnp.moveaxis(f["b"], 0, 1).reshape(layers, n * r, d_out)}
    return out


def peft_linear(lora: dict, scale: float) -> dict:
    """PEFT's ``add_weighted_adapter(weights=[1/N]*N, combination_type="linear")`` of the N adapters (each with
    product scale ``scale``): ``a = Σ_i √(scale/N)·A_i [L, in, r]``, ``b = Σ_i √(scale/N)·B_i [L, r, out]``,
    whose product is used with scale 1 (PEFT gives the new adapter ``lora_alpha = r``)."""
    out = {}
    for name, f in lora.items():
        w = jnp.sqrt(jnp.float32(scale / f["a"].shape[0]))
        out[name] = {"a": jnp.sum(w * f["a"], axis=0), "b": jnp.sum(w * f["b"], axis=0)}
    return out


def merged_adapter(lora: dict, scale: float, rule: str = "mean_delta") -> tuple[dict, float]:
    """The ensemble merged by ``rule`` as one adapter: ``(factors {"a": [L, in, R], "b": [L, R, out]}, product
    scale)``; ``mean_delta``: ``(concat(lora), scale / N)`` (R = N·r); ``peft_linear``: ``(peft_linear(lora,
    scale), 1.0)`` (R = r). See the module docstring."""
    if rule == "mean_delta":
        return concat(lora), scale / jax.tree.leaves(lora)[0].shape[0]
    if rule == "peft_linear":
        return peft_linear(lora, scale), 1.0
    raise ValueError(f"ensemble_merge={rule!r}; valid: {', '.join(MERGE_RULES)}")


def merged_attachment(lora: dict, scale: float, rule: str = "mean_delta") -> dict:
    """The merged ensemble (``merged_adapter``) as ``attach`` puts it next to each target, its scale folded into
    ``b``: ``{target: {"a": [L, in, R], "b": s·B [L, R, out]}}``, to attach with scale 1. The train state keeps π_β
    in this form (``state.behavior``): 1/N of the members' factors under ``peft_linear``."""
    factors, s = merged_adapter(lora, scale, rule)
    return {name: {"a": f["a"], "b": f["b"] if s == 1 else s * f["b"]} for name, f in factors.items()}


def attach_merged(base: dict, lora: dict, scale: float, rule: str = "mean_delta") -> dict:
    """The merged ensemble attached in activation space (``merged_attachment``): the ema/mixup reference and the
    evaluated model, with no weight-sized copy and no rounding of the delta into W."""
    return attach(base, merged_attachment(lora, scale, rule), 1.0)


def attached_axes(layer_axes: dict, layers: dict) -> dict:
    """Logical axes of the ``<target>_lora`` entries of an attached layer dict (no ensemble axis): ``a``
    ``(layers, in, lora_rank)``, ``b`` ``(layers, lora_rank, out)``, from the targets' own axes."""
    names = [k[: -len("_lora")] for k in layers if k.endswith("_lora")]
    return {f"{n}_lora": {k: v[1:] for k, v in f.items()}
            for n, f in lora_axes({"layers": layer_axes}, names).items()}


def delta(factors: dict, scale: float) -> jax.Array:
    """``(α/r)·A B`` for one adapter's factors ``a [L, in, r]``, ``b [L, r, out]`` → ``[L, in, out]`` (float32)."""
    return scale * jnp.einsum("lir,lro->lio", factors["a"], factors["b"], preferred_element_type=jnp.float32)


def merge(base: dict, lora: dict, scale: float, rule: str = "mean_delta") -> dict:
    """The merged ensemble materialised in the weights, for export only (HF folders): each target becomes
    ``W + ΔW`` of ``merged_adapter(lora, scale, rule)``, summed in float32 and cast to W's dtype (a ΔW below
    half an ulp of a bfloat16 W rounds away: never sample or score with it)."""
    layers = dict(base["layers"])
    factors, s = merged_adapter(lora, scale, rule)
    for name, f in factors.items():
        layers[name] = (layers[name].astype(jnp.float32) + delta(f, s)).astype(layers[name].dtype)
    return {**base, "layers": layers}
