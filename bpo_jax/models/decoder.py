"""One decoder-only transformer for Llama / Qwen2 / Qwen3 / Gemma 1-3, as a pure function of a params pytree.

The functional core is ``forward(config, params, input_ids, ...)`` on a plain nested dict of arrays, so the
train state can hold policy, behavior and LoRA weights as ordinary pytrees. ``Decoder`` is the Flax NNX module
around it (``nnx.Param`` leaves carrying their logical axis names) for users who want a module. A layer dict
may also carry LoRA factors next to a weight (``layers["q_lora"] = {"a", "b"}``, see ``lora.attach``): that
projection then adds the adapter in activation space, ``x W + (x A) B`` (``_linear``). Weights of any float
dtype are cast to the compute dtype where they are used (float32 masters work as they are).

Layers are stacked along a leading ``layers`` axis and applied with ``jax.lax.scan`` (one compiled layer, fast
compiles); ``config.remat`` rematerialises each layer in the backward pass: ``full`` keeps only each layer's
input, ``dots`` also keeps its matmul outputs (the projections, not the attention scores), so the backward
recomputes only the cheap elementwise work and the attention. ``unstack_layers`` gives the same
weights as a tuple of per-layer dicts, which ``forward`` runs as an unrolled loop: the sampler's layout, since a
scan reads each layer's weights through a dynamic slice that XLA's CPU backend copies on every decode step.

Attention is causal by slot index with a key-validity mask, so left-padded prompts work (``config.attention =
"cudnn"`` runs a full-sequence forward's attention as cuDNN's fused kernel, with the same mask); ``positions`` are the
RoPE positions (``cumsum(mask) − 1`` for left padding). With a KV cache (``init_cache``), a call writes its keys
and values at slot ``cache_index`` and attends to every valid slot up to its own: a prefill writes the whole
prompt at 0, and a one-token decode step writes at ``prompt_len + step``.

Per-layer differences (Gemma 2/3's local sliding-window vs global layers, Gemma 3's local RoPE base) are data,
not Python branches: a window size and a local-RoPE flag per layer are scanned alongside the layer weights. A
sliding layer's query at slot q sees the keys at slots k with ``q − k < sliding_window`` (HF's convention: the
window counts the query's own token), in the full forward and in cached decoding alike.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bpo_jax.models.config import ModelConfig

Array = jax.Array
Params = dict[str, Any]


def param_axes(config: ModelConfig) -> Params:
    """Logical axis names of every parameter, as a pytree shaped like the params."""
    layers = {
        "attn_norm": ("layers", "norm"),
        "q": ("layers", "embed", "heads"),
        "k": ("layers", "embed", "kv_heads"),
        "v": ("layers", "embed", "kv_heads"),
        "o": ("layers", "heads", "embed"),
        "mlp_norm": ("layers", "norm"),
        "gate": ("layers", "embed", "mlp"),
        "up": ("layers", "embed", "mlp"),
        "down": ("layers", "mlp", "embed"),
    }
    if config.attention_bias:
        layers.update(q_bias=("layers", "heads"), k_bias=("layers", "kv_heads"), v_bias=("layers", "kv_heads"))
    if config.qk_norm:  # per-head norms over head_dim: replicated
        layers.update(q_norm=("layers", "norm"), k_norm=("layers", "norm"))
    if config.sandwich_norms:
        layers.update(post_attn_norm=("layers", "norm"), post_mlp_norm=("layers", "norm"))
    axes = {"embed": ("vocab", "embed"), "layers": layers, "final_norm": ("norm",)}
    if not config.tie_word_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


def param_shapes(config: ModelConfig) -> Params:
    """Shapes of every parameter, as a pytree shaped like the params."""
    c, L = config, config.num_layers
    layers = {
        "attn_norm": (L, c.hidden_size),
        "q": (L, c.hidden_size, c.q_size),
        "k": (L, c.hidden_size, c.kv_size),
        "v": (L, c.hidden_size, c.kv_size),
        "o": (L, c.q_size, c.hidden_size),
        "mlp_norm": (L, c.hidden_size),
        "gate": (L, c.hidden_size, c.intermediate_size),
        "up": (L, c.hidden_size, c.intermediate_size),
        "down": (L, c.intermediate_size, c.hidden_size),
    }
    if c.attention_bias:
        layers.update(q_bias=(L, c.q_size), k_bias=(L, c.kv_size), v_bias=(L, c.kv_size))
    if c.qk_norm:
        layers.update(q_norm=(L, c.head_dim), k_norm=(L, c.head_dim))
    if c.sandwich_norms:
        layers.update(post_attn_norm=(L, c.hidden_size), post_mlp_norm=(L, c.hidden_size))
    shapes = {"embed": (c.vocab_size, c.hidden_size), "layers": layers, "final_norm": (c.hidden_size,)}
    if not c.tie_word_embeddings:
        shapes["lm_head"] = (c.hidden_size, c.vocab_size)
    return shapes


def init_params(config: ModelConfig, key: Array) -> Params:
    """Random parameters (normal, std 0.02; norms at their identity value) — for tests and from-scratch runs."""
    shapes = param_shapes(config)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    with_paths = jax.tree.flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]
    paths = [jax.tree_util.keystr(p) for p, _ in with_paths]
    keys = jax.random.split(key, len(leaves))
    dtype = jnp.dtype(config.param_dtype)
    out = []
    for path, shape, k in zip(paths, leaves, keys):
        if "norm" in path:
            out.append(jnp.full(shape, 0.0 if config.norm_plus_one else 1.0, dtype))
        elif "bias" in path:
            out.append(jnp.zeros(shape, dtype))
        else:
            out.append((0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return jax.tree.unflatten(treedef, out)


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None, *, mesh=None,
               per_layer: bool = False) -> Params:
    """A preallocated KV cache: ``k``/``v`` ``[layers, B, max_len, kv_heads, head_dim]`` (``dtype``, default the
    compute dtype; with ``per_layer``, tuples of ``[B, max_len, kv_heads, head_dim]`` arrays, for the
    ``unstack_layers`` layout) and the slot validity ``valid [B, max_len]`` (False until a call writes a real
    token there). With ``mesh``, rows are sharded over its batch axes and kv heads over ``tensor``."""
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (batch, max_len, config.num_kv_heads, config.head_dim)

    def build():
        if per_layer:
            k = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
            v = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
        else:
            k = jnp.zeros((config.num_layers, *shape), dtype)
            v = jnp.zeros((config.num_layers, *shape), dtype)
        return {"k": k, "v": v, "valid": jnp.zeros((batch, max_len), bool)}

    if mesh is None:
        return build()
    from bpo_jax.runtime import sharding as shd

    # Built in place on every device (also across hosts): no host buffer, no transfer.
    return jax.jit(build, out_shardings=shd.cache_shardings(jax.eval_shape(build), mesh))()


@jax.jit
def unstack_layers(params: Params) -> Params:
    """``params`` with ``layers`` as a tuple of per-layer dicts (one copy of the layer weights, each keeping its
    sharding); ``forward`` runs that layout as an unrolled loop over the layers."""
    layers = params["layers"]
    num_layers = jax.tree.leaves(layers)[0].shape[0]
    return {**params, "layers": tuple(jax.tree.map(lambda a: a[i], layers) for i in range(num_layers))}


def _rms_norm(x, w, eps, plus_one):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    w = w.astype(jnp.float32)
    return (xf * (1.0 + w if plus_one else w)).astype(x.dtype)


def _rope(x, cos, sin):
    """Rotate-half RoPE (HF convention) on ``x [B, T, H, D]`` with ``cos/sin [B, T, D/2]``."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


_REMAT = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def _softcap(x, cap):
    return x if cap is None else jnp.tanh(x / cap) * cap


def _attention(q, k, v, q_slots, valid, config, window, branches=None, fused=None):
    """GQA attention of ``q [B, T, H, D]`` over ``k/v [B, S, KV, D]``: query at slot t sees valid slots ≤ t
    (and, on a sliding layer, > t − ``window``). Scores: scaled, softcapped (Gemma 2), then masked, as HF.
    ``branches = (branch [B, T], positions [B, T])`` (no cache): a query also sees only the shared prefix
    (branch 0) and its own branch, and the sliding window is measured in positions. ``fused`` ("cudnn", or
    "xla" for JAX's reference of the same call) runs ``jax.nn.dot_product_attention`` with that mask instead:
    cuDNN's flash attention keeps no ``[B, H, T, S]`` scores for the backward. It needs even T and S with a
    mask, so an odd length gets one masked slot more (a query that sees nothing, sliced off; a key no query sees)."""
    c = config
    b, t, h, d = q.shape
    kvh = k.shape[2]
    scale = np.sqrt(c.query_pre_attn_scalar if c.query_pre_attn_scalar is not None else d)
    slots = jnp.arange(k.shape[1])
    allowed = (slots[None, None, :] <= q_slots[:, :, None]) & valid[:, None, :]  # [B, T, S]
    if branches is not None:
        branch, pos = branches
        allowed &= (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
    if c.has_sliding:
        dist = q_slots[:, :, None] - slots[None, None, :] if branches is None else pos[:, :, None] - pos[:, None, :]
        allowed &= dist < window
    if fused is not None and c.attn_logit_softcapping is None:
        pt, ps = t % 2, k.shape[1] % 2
        pad = lambda x, n: jnp.pad(x, [(0, 0), (0, n)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731  axis 1 by n
        out = jax.nn.dot_product_attention(pad(q, pt), pad(k, ps), pad(v, ps),
                                           mask=jnp.pad(allowed, ((0, 0), (0, pt), (0, ps)))[:, None],
                                           scale=float(1 / scale), implementation=fused)
        return out[:, :t].reshape(b, t, h * d)
    q = q.reshape(b, t, kvh, h // kvh, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / scale
    scores = _softcap(scores, c.attn_logit_softcapping)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h * d).astype(q.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x, w, accumulate=None):
    """``x [..., i] @ w [i, o]``; with ``accumulate`` (a dtype) the products are accumulated and returned in it.

    The backward is written out (what autodiff would compute) so that on XLA's CPU backend the weight gradient
    ``Σ_rows xᵀ g`` transposes the *smaller* of x and g, as its own copy: left to itself, the backend transposes
    g inside the fusion that produces it (the SiLU backward of the MLP, ``[rows, 1536]`` for SmolLM2), a
    strided write that took ~20% of a CPU train step. Other backends get the plain contraction."""
    return _matmul_fwd(x, w, accumulate)[0]


def _matmul_fwd(x, w, accumulate):
    y = x @ w if accumulate is None else jnp.einsum("...i,io->...o", x, w, preferred_element_type=accumulate)
    return y, (x, w)


def _matmul_bwd(accumulate, res, g):
    x, w = res
    g = g.astype(x.dtype)
    f32 = jnp.float32
    dx = jnp.einsum("...o,io->...i", g, w, preferred_element_type=f32).astype(x.dtype)
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    if jax.default_backend() != "cpu":
        dw = jnp.einsum("ni,no->io", x2, g2, preferred_element_type=f32)
    elif x2.shape[1] <= g2.shape[1]:
        dw = jnp.matmul(jax.lax.optimization_barrier(x2.T), g2, preferred_element_type=f32)
    else:
        dw = jnp.matmul(jax.lax.optimization_barrier(g2.T), x2, preferred_element_type=f32).T
    return dx, dw.astype(w.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _linear(x, lp, name):
    """``x W`` for the layer weight ``lp[name]``, in ``x``'s dtype. With LoRA factors next to it
    (``lp["<name>_lora"] = {"a": A [in, r], "b": B [r, out]}``, the scale already in B; ``lora.attach``):
    ``y = x W + (x A) B``, each product accumulated in float32 and the sum rounded once to ``x``'s dtype."""
    w = lp[name].astype(x.dtype)
    f = lp.get(f"{name}_lora")
    if f is None:
        return _matmul(x, w)
    f32 = jnp.float32
    xa = _matmul(x, f["a"].astype(x.dtype), f32).astype(x.dtype)
    return (_matmul(x, w, f32) + _matmul(xa, f["b"].astype(x.dtype), f32)).astype(x.dtype)


def _mlp(x, lp, config):
    gate = _linear(x, lp, "gate")
    if config.hidden_act == "silu":
        act = jax.nn.silu(gate)
    else:
        act = jax.nn.gelu(gate, approximate=config.hidden_act == "gelu_tanh")
    return _linear(act * _linear(x, lp, "up"), lp, "down")


def _layer(config, x, lp, rope, meta, k_cache, v_cache, valid, q_slots, cache_index, branches=None):
    """One pre-norm block (with Gemma 2/3's post-attention and post-MLP norms when ``sandwich_norms``).
    ``rope``: ``((cos, sin), (cos_local, sin_local) or None)``; ``meta``: this layer's ``(window, is_local)``
    scalars. Returns the new hidden state and this layer's (updated) keys/values."""
    c = config
    b, t, _ = x.shape
    window, local = meta
    (cos, sin), local_rope = rope
    if local_rope is not None:  # Gemma 3: the sliding layers' own RoPE base, chosen by data under the scan
        cos, sin = jnp.where(local, local_rope[0], cos), jnp.where(local, local_rope[1], sin)
    norm = lambda y, name: _rms_norm(y, lp[name], c.rms_norm_eps, c.norm_plus_one)  # noqa: E731
    hn = norm(x, "attn_norm")

    def proj(name, heads):
        y = _linear(hn, lp, name)
        y = y + lp[f"{name}_bias"].astype(x.dtype) if c.attention_bias else y
        y = y.reshape(b, t, heads, c.head_dim)
        return norm(y, f"{name}_norm") if c.qk_norm and name != "v" else y  # Qwen3 / Gemma 3, before RoPE

    q = _rope(proj("q", c.num_heads), cos, sin)
    k = _rope(proj("k", c.num_kv_heads), cos, sin)
    v = proj("v", c.num_kv_heads)
    if k_cache is not None:
        k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), cache_index, axis=1)
        v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), cache_index, axis=1)
    fused = c.attention if c.attention != "xla" and k_cache is None else None  # cached decoding: always xla
    attn = _linear(_attention(q, k.astype(x.dtype), v.astype(x.dtype), q_slots, valid, c, window, branches, fused),
                   lp, "o")
    x = x + (norm(attn, "post_attn_norm") if c.sandwich_norms else attn)
    mlp = _mlp(norm(x, "mlp_norm"), lp, c)
    x = x + (norm(mlp, "post_mlp_norm") if c.sandwich_norms else mlp)
    return x, k, v


def hidden_states(config: ModelConfig, params: Params, input_ids: Array, *, positions=None, attention_mask=None,
                  cache=None, cache_index=0, branch=None):
    """Final normed hidden states ``[B, T, D]`` (compute dtype) and the updated cache (None without one).

    ``attention_mask [B, T]`` marks real tokens (0 = padding). ``positions [B, T]`` default to
    ``cumsum(mask) − 1``, which is right for a full sequence or a prefill at ``cache_index=0``; a decode step
    must pass its positions. ``branch [B, T]`` packs several continuations of one prefix in a row (no cache;
    ``positions`` required): slots of branch 0 are the shared prefix, and a slot of branch k > 0 attends to the
    prefix and to branch k only, so ``[prompt | response 1 | response 2]`` gives each response the hidden
    states it would have after the prompt alone. With ``cache``, this call's keys/values go to slots ``cache_index …
    cache_index + T − 1`` and each query attends to the valid slots up to its own. Stacked ``layers`` run
    under a scan with a stacked cache; ``unstack_layers`` params run unrolled with a ``per_layer`` cache.
    """
    c = config
    dtype = jnp.dtype(c.dtype)
    b, t = input_ids.shape
    mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    if branch is not None and (positions is None or cache is not None):
        raise ValueError("branch needs explicit positions and no cache")
    branches = None if branch is None else (branch, positions)
    if positions is None:
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    x = params["embed"][input_ids].astype(dtype)
    if c.scale_embeddings:
        x = x * jnp.asarray(np.sqrt(c.hidden_size), dtype)

    def table(local):
        angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(c.rope_inv_freq(local), jnp.float32)
        return jnp.cos(angles), jnp.sin(angles)

    rope = (table(False), table(True) if c.has_local_rope else None)
    meta = (jnp.asarray(c.layer_windows()), jnp.asarray(c.layer_is_local()))  # [L] each, scanned with the layers
    q_slots = cache_index + jnp.broadcast_to(jnp.arange(t), (b, t))
    if cache is None:
        valid = mask
    else:
        valid = jax.lax.dynamic_update_slice_in_dim(cache["valid"], mask, cache_index, axis=1)

    layer = _layer if c.remat == "none" else jax.checkpoint(_layer, static_argnums=(0,), policy=_REMAT[c.remat])

    x, new_cache = _run_layers(c, params["layers"], x, layer, rope, meta, valid, q_slots, cache, cache_index,
                               branches)
    return _rms_norm(x, params["final_norm"], c.rms_norm_eps, c.norm_plus_one), new_cache


def _run_layers(c: ModelConfig, layers, x, layer, rope, meta, valid, q_slots, cache, cache_index, branches):
    """``hidden_states``' layer stack: ``x`` through every layer, returning ``(x, new_cache)``. Stacked ``layers``
    run under a scan (with the stacked cache, when there is one); a tuple of per-layer weights
    (``unstack_layers``) runs unrolled with a per-layer cache."""
    if isinstance(layers, (tuple, list)):  # unstack_layers: an unrolled loop over per-layer weights
        n = len(layers)
        ks, vs = (list(cache["k"]), list(cache["v"])) if cache is not None else ([None] * n, [None] * n)
        for i, lp in enumerate(layers):
            meta_i = (meta[0][i], meta[1][i])
            x, ks[i], vs[i] = layer(c, x, lp, rope, meta_i, ks[i], vs[i], valid, q_slots, cache_index, branches)
        new_cache = None if cache is None else {"k": tuple(ks), "v": tuple(vs), "valid": valid}
    elif cache is None:
        def body(h, lp_meta):
            lp, meta_i = lp_meta
            h, _, _ = layer(c, h, lp, rope, meta_i, None, None, valid, q_slots, cache_index, branches)
            return h, None

        x, _ = jax.lax.scan(body, x, (layers, meta))
        new_cache = None
    else:
        def body(carry, lp_i):
            h, ks, vs = carry
            lp, meta_i, i = lp_i
            h, k, v = layer(c, h, lp, rope, meta_i, ks[i], vs[i], valid, q_slots, cache_index)
            return (h, ks.at[i].set(k), vs.at[i].set(v)), None

        (x, ks, vs), _ = jax.lax.scan(body, (x, cache["k"], cache["v"]),
                                      (layers, meta, jnp.arange(c.num_layers)))
        new_cache = {"k": ks, "v": vs, "valid": valid}
    return x, new_cache


def unembed(config: ModelConfig, params: Params) -> Array:
    """The ``[D, V]`` output projection (the transposed embeddings when they are tied), so a loss can turn
    ``hidden_states`` into log-probs chunk by chunk without a ``[B, T, V]`` array. ``h @ unembed`` is the logits
    only without ``final_logit_softcapping`` (Gemma 2/3); ``logits_from_hidden`` applies it."""
    return params["embed"].T if config.tie_word_embeddings else params["lm_head"]


def logits_from_hidden(config: ModelConfig, params: Params, h: Array) -> Array:
    """float32 logits ``[..., V]`` from hidden states, accumulated in float32 (and softcapped, for Gemma 2/3
    configs with ``final_logit_softcapping``)."""
    w = unembed(config, params).astype(h.dtype)
    return _softcap(jnp.einsum("...d,dv->...v", h, w, preferred_element_type=jnp.float32),
                    config.final_logit_softcapping)


def forward(config: ModelConfig, params: Params, input_ids: Array, *, positions=None, attention_mask=None,
            cache=None, cache_index=0, last_only: bool = False):
    """``(logits [B, T, V] float32, new_cache)``; ``last_only`` computes logits for the last position only."""
    h, new_cache = hidden_states(config, params, input_ids, positions=positions, attention_mask=attention_mask,
                                 cache=cache, cache_index=cache_index)
    if last_only:
        h = h[:, -1:]
    return logits_from_hidden(config, params, h), new_cache


class Decoder(nnx.Module):
    """Flax NNX module over ``forward``: ``nnx.Param`` leaves with ``out_sharding`` = logical axes.

    ``Decoder(config, rngs=nnx.Rngs(0))`` initialises randomly; ``Decoder.from_params(config, params)`` wraps
    existing arrays. ``model(input_ids)`` gives logits; ``model.params`` is the plain params pytree.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs | None = None, params: Params | None = None):
        self.config = config
        if params is None:
            params = init_params(config, (rngs or nnx.Rngs(0)).params())
        axes = param_axes(config)
        self.weights = nnx.data(jax.tree.map(lambda a, ax: nnx.Param(a, out_sharding=ax, eager_sharding=False),
                                             params, axes, is_leaf=lambda x: isinstance(x, tuple)))

    @classmethod
    def from_params(cls, config: ModelConfig, params: Params) -> "Decoder":
        return cls(config, params=params)

    @property
    def params(self) -> Params:
        return jax.tree.map(lambda p: p[...], self.weights, is_leaf=lambda x: isinstance(x, nnx.Param))

    def __call__(self, input_ids, *, positions=None, attention_mask=None):
        logits, _ = forward(self.config, self.params, jnp.asarray(input_ids), positions=positions,
                            attention_mask=attention_mask)
        return logits
