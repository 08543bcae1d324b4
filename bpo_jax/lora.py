"""LoRA ensembles as plain pytrees: float32 master factors, applied in activation space or merged in weights.

An ensemble of N adapters on a set of target matrices: for a target ``W [layers, in, out]`` each adapter has
``A [N, layers, in, r]`` and ``B [N, layers, r, out]`` with ``ΔW_i = s · A_i B_i``, ``s = α / r``. A fresh adapter
is initialised as PEFT does (``init_lora_weights=True``): ``B = 0``, so every adapter starts at the base model,
and ``A`` Kaiming-uniform with ``a = √5`` over its ``in`` fan-in, i.e. ``U(−1/√in, 1/√in)``, with its own seed per
adapter; or the ensemble starts from PEFT adapter folders (``bpo_jax.peft_adapters``). The factors are float32
whatever the base's dtype: they are the optimizer's master weights.

Training applies an adapter in activation space, as PEFT does: ``attach`` puts the factors next to each target
(``layers["<target>_lora"] = {"a": A, "b": s·B}``) and the decoder computes ``y = x W + (x A)(s B)``, summed in
float32 and rounded once (``decoder._linear``). No weight-sized copy is built, and a ``ΔW`` below half an ulp
of ``W`` still reaches the output, which adding it to a bfloat16 ``W`` would round away.

The merged ensemble — BPO's behavior LLM π_β and the evaluated model — is the base plus the *mean of the
adapters' weight deltas*: ``W + (1/N) Σ_i ΔW_i``. In activation space it is one adapter of rank N·r (exact):
``(1/N) Σ_i A_i B_i = [A_1 … A_N][B_1; …; B_N] / N`` (``attach_mean``); ``merge`` materialises it (float32 sum,
cast to W's dtype) for sampling and export. PEFT's ``add_weighted_adapter(..., combination_type="linear")``,
which the paper's authors used, instead averages the factors (``A' = Σ √w_i·s_i·A_i``, ``B' = Σ √w_i·B_i``), so
its merged delta ``A'B'`` also contains the cross terms ``A_i B_j`` (i ≠ j) and is not the mean of the deltas.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Target names: ours and the HF module names users know.
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
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
        layers[f"{name}_lora"] = {"a": f["a"], "b": scale * f["b"]}
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


def attach_mean(base: dict, lora: dict, scale: float) -> dict:
    """The merged ensemble in activation space: ``attach(base, concat(lora), scale / N)``, exactly
    ``W + (1/N) Σ_i ΔW_i`` without building it."""
    n = jax.tree.leaves(lora)[0].shape[0]
    return attach(base, concat(lora), scale / n)


def delta(factors: dict, scale: float) -> jax.Array:
    """``(α/r)·A B`` for one adapter's factors ``a [L, in, r]``, ``b [L, r, out]`` → ``[L, in, out]`` (float32)."""
    return scale * jnp.einsum("lir,lro->lio", factors["a"], factors["b"], preferred_element_type=jnp.float32)


def merge(base: dict, lora: dict, scale: float) -> dict:
    """The ensemble's merged params, materialised (for sampling and export): each target becomes
    ``(W + (1/N) Σ_i ΔW_i)`` summed in float32 and cast to W's dtype."""
    layers = dict(base["layers"])
    for name, f in lora.items():
        mean_delta = delta(concat({name: f})[name], scale / f["a"].shape[0])
        layers[name] = (layers[name].astype(jnp.float32) + mean_delta).astype(layers[name].dtype)
    return {**base, "layers": layers}
