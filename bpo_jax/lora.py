"""LoRA ensembles as plain pytrees, and their weight-space merge.

An ensemble of N adapters on a set of target matrices: for a target ``W [layers, in, out]`` each adapter has
``A [N, layers, in, r]`` and ``B [N, layers, r, out]`` with ``ΔW_i = (α / r) · A_i B_i``. ``B`` starts at zero,
so every adapter starts at the base model; each adapter has its own initialisation seed for ``A``.

The merged ensemble — BPO's behavior LLM π_β and the evaluated model — is the base plus the *mean of the
adapters' weight deltas*: ``W + (1/N) Σ_i ΔW_i``. This is an exact average in weight space. PEFT's
``add_weighted_adapter(..., combination_type="linear")``, which the paper's authors used, instead averages the
factors (``A' = Σ √w_i·s_i·A_i``, ``B' = Σ √w_i·B_i``), so its merged delta ``A'B'`` also contains the cross
terms ``A_i B_j`` (i ≠ j) and is not the mean of the deltas.
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


def init_lora(key, base_layers: dict, *, targets, rank: int, num_adapters: int, dtype=jnp.float32) -> dict:
    """``{target: {"a": [N, L, in, r], "b": [N, L, r, out]}}``; A ~ N(0, 1/in), B = 0."""
    lora = {}
    for i, name in enumerate(targets):
        n_layers, d_in, d_out = base_layers[name].shape
        k = jax.random.fold_in(key, i)
        a = jax.random.normal(k, (num_adapters, n_layers, d_in, rank), jnp.float32) / jnp.sqrt(d_in)
        lora[name] = {"a": a.astype(dtype), "b": jnp.zeros((num_adapters, n_layers, rank, d_out), dtype)}
    return lora


def lora_axes(base_axes: dict, targets) -> dict:
    """Logical axes of the LoRA factors, from the targets' own axes."""
    out = {}
    for name in targets:
        layers, ax_in, ax_out = base_axes["layers"][name]
        out[name] = {"a": ("ensemble", layers, ax_in, "lora_rank"), "b": ("ensemble", layers, "lora_rank", ax_out)}
    return out


def delta(factors: dict, scale: float) -> jax.Array:
    """``(α/r)·A B`` for one adapter's factors ``a [L, in, r]``, ``b [L, r, out]`` → ``[L, in, out]`` (float32)."""
    return scale * jnp.einsum("lir,lro->lio", factors["a"], factors["b"], preferred_element_type=jnp.float32)


def apply_one(base: dict, lora_i: dict, scale: float) -> dict:
    """The params of a single adapter: base with ``ΔW_i`` added to each target (``lora_i`` has no N axis)."""
    layers = dict(base["layers"])
    for name, f in lora_i.items():
        layers[name] = (layers[name].astype(jnp.float32) + delta(f, scale)).astype(layers[name].dtype)
    return {**base, "layers": layers}


def merge(base: dict, lora: dict, scale: float) -> dict:
    """The ensemble's merged params: base plus the mean over the N adapters of ``ΔW_i``."""
    layers = dict(base["layers"])
    for name, f in lora.items():
        mean_delta = scale * jnp.einsum("nlir,nlro->lio", f["a"], f["b"], preferred_element_type=jnp.float32)
        mean_delta = mean_delta / f["a"].shape[0]
        layers[name] = (layers[name].astype(jnp.float32) + mean_delta).astype(layers[name].dtype)
    return {**base, "layers": layers}
