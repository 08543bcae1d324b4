"""DeBERTa-v2/v3 ``*ForSequenceClassification`` reward models (e.g. OpenAssistant's
``reward-model-deberta-v3-large-v2``, the paper's annotator) as a pure function of a params pytree.

``deberta_scores(config, params, input_ids, attention_mask, token_type_ids)`` follows HF transformers'
``DebertaV2ForSequenceClassification``: embeddings (word, optional absolute positions and token types, the
``embed_proj`` projection, LayerNorm, masking), encoder layers with disentangled attention (content→content plus
content→position ``c2p`` and position→content ``p2c`` terms over log-bucketed relative positions, scaled by
``sqrt(head_dim · (1 + len(pos_att_type)))``), then the context pooler (dense + activation) on the first real
token and a one-label classifier. Positions are ``cumsum(mask) − 1`` per row, so a row scores the same however
it is padded; on right-padded rows (what HF tokenizers produce) this is exactly HF's computation. The ConvLayer
of deberta-v2-xlarge/xxlarge (``conv_kernel_size`` > 0) is not supported; v3 checkpoints have none.

Weights are read from safetensors straight into their mesh shardings, like the decoder's (``loading.py``).
Linear kernels are stored ``[in, out]``; encoder layers are stacked along a leading ``layers`` axis and run with
``jax.lax.scan``. LayerNorm, attention scores and softmax are float32; matmuls run in the compute ``dtype``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from bpo_jax.models.loading import folder_tokenizer, read_leaf, safetensors_tensors
from bpo_jax.runtime import sharding as shd

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
}
POS_ATT_TYPES = ("c2p", "p2c")


@dataclasses.dataclass(frozen=True)
class DebertaConfig:
    vocab_size: int
    hidden_size: int
    embedding_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    position_biased_input: bool
    relative_attention: bool
    pos_att_type: tuple[str, ...]
    position_buckets: int
    max_relative_positions: int
    share_att_key: bool
    norm_rel_ebd: bool
    hidden_act: str
    pooler_hidden_act: str
    layer_norm_eps: float
    param_dtype: str = "float32"
    dtype: str = "float32"

    @property
    def att_span(self) -> int:
        """Relative distances run over ``[-att_span, att_span)``: ``2·att_span`` relative embeddings."""
        return self.position_buckets if self.position_buckets > 0 else self.max_relative_positions

    @classmethod
    def from_hf(cls, hf: dict, *, param_dtype: str = "float32", dtype: str = "float32") -> "DebertaConfig":
        """From an HF ``config.json`` dict (``model_type`` ``deberta-v2``), with HF's defaults for absent keys;
        variants this module does not implement raise a ValueError naming the key."""
        if hf.get("model_type") != "deberta-v2":
            raise ValueError(f"model_type={hf.get('model_type')!r} is not deberta-v2")
        if hf.get("conv_kernel_size", 0) > 0:
            raise ValueError(f"conv_kernel_size={hf['conv_kernel_size']}: the DeBERTa-v2 ConvLayer (v2-xlarge/xxlarge) "
                             f"is not supported; DeBERTa-v3 checkpoints have conv_kernel_size 0")
        pos_att = hf.get("pos_att_type") or []
        if isinstance(pos_att, str):
            pos_att = pos_att.lower().split("|")
        pos_att = tuple(dict.fromkeys(p.strip() for p in pos_att))  # HF counts each kind once
        if any(p not in POS_ATT_TYPES for p in pos_att):
            raise ValueError(f"pos_att_type={list(pos_att)} is not supported; use a subset of {list(POS_ATT_TYPES)}")
        norm_rel = [x.strip() for x in str(hf.get("norm_rel_ebd", "none")).lower().split("|")]
        if any(x not in ("none", "layer_norm") for x in norm_rel):
            raise ValueError(f"norm_rel_ebd={hf['norm_rel_ebd']!r} is not supported; use 'layer_norm' or 'none'")
        for key in ("hidden_act", "pooler_hidden_act"):
            if hf.get(key, "gelu") not in ACTIVATIONS:
                raise ValueError(f"{key}={hf[key]!r} is not supported; use one of {sorted(ACTIVATIONS)}")
        hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
        if hf.get("pooler_hidden_size", hidden) != hidden:
            raise ValueError(f"pooler_hidden_size={hf['pooler_hidden_size']} differs from hidden_size={hidden}")
        if "attention_head_size" not in hf and hidden % heads:
            raise ValueError(f"hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
        max_pos = hf.get("max_position_embeddings", 512)
        max_rel = hf.get("max_relative_positions", -1)
        return cls(vocab_size=hf["vocab_size"], hidden_size=hidden, embedding_size=hf.get("embedding_size") or hidden,
                   num_layers=hf["num_hidden_layers"], num_heads=heads,
                   head_dim=hf.get("attention_head_size", hidden // heads),
                   intermediate_size=hf["intermediate_size"], max_position_embeddings=max_pos,
                   type_vocab_size=hf.get("type_vocab_size", 0),
                   position_biased_input=hf.get("position_biased_input", True),
                   relative_attention=hf.get("relative_attention", False), pos_att_type=pos_att,
                   position_buckets=hf.get("position_buckets", -1),
                   max_relative_positions=max_rel if max_rel >= 1 else max_pos,
                   share_att_key=hf.get("share_att_key", False), norm_rel_ebd="layer_norm" in norm_rel,
                   hidden_act=hf.get("hidden_act", "gelu"), pooler_hidden_act=hf.get("pooler_hidden_act", "gelu"),
                   layer_norm_eps=hf.get("layer_norm_eps", 1e-7), param_dtype=param_dtype, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class _Entry:
    path: tuple[str, ...]  # where the leaf goes in the params pytree
    hf_name: str  # "{i}" stands for the layer index of a stacked (per-layer) weight
    shape: tuple[int, ...]  # bpo_jax layout (stacked leaves lead with the layer count)
    axes: tuple[str | None, ...]  # logical axis names (``sharding.DEFAULT_RULES``)
    transposed: bool = False  # HF stores it [out, in]; bpo_jax [in, out]


def _entries(c: DebertaConfig) -> list[_Entry]:
    """Every parameter this config needs: its HF tensor name, shape and logical axes."""
    H, E, L, F, Q = c.hidden_size, c.embedding_size, c.num_layers, c.intermediate_size, c.num_heads * c.head_dim
    out = [_Entry(("embed", "word"), "deberta.embeddings.word_embeddings.weight", (c.vocab_size, E),
                  ("vocab", "embed"))]
    if c.position_biased_input:
        out.append(_Entry(("embed", "position"), "deberta.embeddings.position_embeddings.weight",
                          (c.max_position_embeddings, E), (None, "embed")))
    if c.type_vocab_size > 0:
        out.append(_Entry(("embed", "token_type"), "deberta.embeddings.token_type_embeddings.weight",
                          (c.type_vocab_size, E), (None, "embed")))
    if E != H:
        out.append(_Entry(("embed", "proj"), "deberta.embeddings.embed_proj.weight", (E, H), (None, "embed"), True))

    def norm(path, prefix, layers=()):
        axes = ("layers", "norm") if layers else ("norm",)
        return [_Entry((*path, "scale"), f"{prefix}.weight", (*layers, H), axes),
                _Entry((*path, "bias"), f"{prefix}.bias", (*layers, H), axes)]

    def dense(path, prefix, d_in, d_out, axes, layers=()):
        lead = ("layers",) if layers else ()
        return [_Entry((*path, "kernel"), f"{prefix}.weight", (*layers, d_in, d_out), (*lead, *axes), True),
                _Entry((*path, "bias"), f"{prefix}.bias", (*layers, d_out), (*lead, axes[1]))]

    out += norm(("embed", "norm"), "deberta.embeddings.LayerNorm")
    layer = "deberta.encoder.layer.{i}"
    projections = ["query", "key", "value"]
    if c.relative_attention and not c.share_att_key:
        projections += ["pos_key"] * ("c2p" in c.pos_att_type) + ["pos_query"] * ("p2c" in c.pos_att_type)
    for name in projections:
        out += dense(("layers", name), f"{layer}.attention.self.{name}_proj", H, Q, ("embed", "heads"), (L,))
    out += dense(("layers", "attn_out"), f"{layer}.attention.output.dense", Q, H, ("heads", "embed"), (L,))
    out += norm(("layers", "attn_norm"), f"{layer}.attention.output.LayerNorm", (L,))
    out += dense(("layers", "mlp_in"), f"{layer}.intermediate.dense", H, F, ("embed", "mlp"), (L,))
    out += dense(("layers", "mlp_out"), f"{layer}.output.dense", F, H, ("mlp", "embed"), (L,))
    out += norm(("layers", "mlp_norm"), f"{layer}.output.LayerNorm", (L,))
    if c.relative_attention:
        out.append(_Entry(("rel_embeddings",), "deberta.encoder.rel_embeddings.weight", (2 * c.att_span, H),
                          (None, "embed")))
        if c.norm_rel_ebd:
            out += norm(("rel_norm",), "deberta.encoder.LayerNorm")
    out += dense(("pooler",), "pooler.dense", H, H, ("embed", None))
    out += dense(("classifier",), "classifier", H, 1, ("embed", None))
    return out


def open_folder(path: str, *, param_dtype: str = "float32", dtype: str = "float32"):
    """``(DebertaConfig, tensors, tokenizer)`` from an HF folder: config.json, model.safetensors (or a sharded
    index) and optionally tokenizer files (the tokenizer is None without them)."""
    with open(os.path.join(path, "config.json")) as f:
        config = DebertaConfig.from_hf(json.load(f), param_dtype=param_dtype, dtype=dtype)
    tokenizer = folder_tokenizer(path)
    if tokenizer is not None and len(tokenizer) > config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}")
    return config, safetensors_tensors(path), tokenizer


def read_params(config: DebertaConfig, tensors, *, mesh=None, rules=None) -> dict:
    """The params pytree from ``tensors`` (name → sliceable view), checking each tensor's presence and shape
    against ``config``; with a ``mesh`` each leaf is read shard by shard into its ``NamedSharding``."""
    params: dict = {}
    for e in _entries(config):
        stacked = "{i}" in e.hf_name
        names = [e.hf_name.format(i=i) for i in range(config.num_layers)] if stacked else [e.hf_name]
        sharding = None if mesh is None else jax.sharding.NamedSharding(
            mesh, shd.spec_for(e.axes, e.shape, mesh, rules))
        node = params
        for key in e.path[:-1]:
            node = node.setdefault(key, {})
        node[e.path[-1]] = read_leaf(tensors, names, e.shape, stacked=stacked, transposed=e.transposed,
                                     dtype=np.dtype(config.param_dtype), sharding=sharding)
    return params


def log_bucket_table(config: DebertaConfig, length: int) -> np.ndarray:
    """Relative position ids of the distances ``-(length-1) … length-1`` (index ``d + length - 1``), log-bucketed
    as HF's ``make_log_bucket_position`` does (the same float32 ops) when ``position_buckets`` > 0."""
    rel = np.arange(-(length - 1), length, dtype=np.int64)
    if config.position_buckets <= 0:
        return rel.astype(np.int32)
    mid = config.position_buckets // 2
    abs_pos = np.where((rel < mid) & (rel > -mid), mid - 1, np.abs(rel))
    log_pos = np.ceil(np.log(abs_pos.astype(np.float32) / np.float32(mid))
                      / np.log(np.float32((config.max_relative_positions - 1) / mid))
                      * np.float32(mid - 1)) + np.float32(mid)
    return np.where(abs_pos <= mid, rel.astype(np.float32), log_pos * np.sign(rel)).astype(np.int32)


def _layer_norm(x, p, eps):
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)


def _mm(spec, a, b, dtype):
    """An einsum of the operands cast to the compute dtype, accumulated and returned in float32."""
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _dense(x, p, dtype):
    return _mm("...i,io->...o", x, p["kernel"], dtype) + p["bias"].astype(jnp.float32)


def _heads(x, c: DebertaConfig):
    return x.reshape(*x.shape[:-1], c.num_heads, c.head_dim)


def _layer(c: DebertaConfig, p, h, valid, rel, rel_emb):
    """One encoder layer on ``h [B, T, H]``: disentangled self-attention, then the MLP, each post-LayerNorm."""
    dtype = jnp.dtype(c.dtype)
    q, k, v = (_heads(_dense(h, p[n], dtype), c) for n in ("query", "key", "value"))
    scale = jnp.sqrt(jnp.float32(c.head_dim) * (1 + len(c.pos_att_type)))
    scores = _mm("bqnd,bknd->bnqk", q, k / scale, dtype)
    if c.relative_attention:
        span = c.att_span
        if "c2p" in c.pos_att_type:
            pos_k = _heads(_dense(rel_emb, p["key" if c.share_att_key else "pos_key"], dtype), c)
            c2p = _mm("bqnd,rnd->bnqr", q, pos_k, dtype)
            idx = jnp.clip(rel + span, 0, 2 * span - 1)[:, None]
            scores += jnp.take_along_axis(c2p, idx, axis=-1) / scale
        if "p2c" in c.pos_att_type:
            pos_q = _heads(_dense(rel_emb, p["query" if c.share_att_key else "pos_query"], dtype), c)
            p2c = _mm("bknd,rnd->bnkr", k, pos_q, dtype)
            idx = jnp.clip(-rel + span, 0, 2 * span - 1)[:, None]
            scores += jnp.swapaxes(jnp.take_along_axis(p2c, idx, axis=-1), -1, -2) / scale
    pair = valid[:, None, :, None] & valid[:, None, None, :]
    probs = jax.nn.softmax(jnp.where(pair, scores, jnp.finfo(jnp.float32).min), axis=-1)
    ctx = _mm("bnqk,bknd->bqnd", probs, v, dtype)
    ctx = ctx.reshape(*ctx.shape[:2], -1)
    h = _layer_norm(_dense(ctx, p["attn_out"], dtype) + h, p["attn_norm"], c.layer_norm_eps)
    mlp = ACTIVATIONS[c.hidden_act](_dense(h, p["mlp_in"], dtype))
    return _layer_norm(_dense(mlp, p["mlp_out"], dtype) + h, p["mlp_norm"], c.layer_norm_eps)


@functools.partial(jax.jit, static_argnums=0)
def deberta_scores(config: DebertaConfig, params: dict, input_ids, attention_mask, token_type_ids) -> jax.Array:
    """``[B]`` float32 scores (the classifier's one logit) of ``[B, T]`` rows; every row needs a real token."""
    c, dtype = config, jnp.dtype(config.dtype)
    t = input_ids.shape[1]
    valid = attention_mask > 0
    pos = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    emb = params["embed"]
    x = emb["word"].astype(jnp.float32)[input_ids]
    if c.position_biased_input:
        x += emb["position"].astype(jnp.float32)[pos]
    if c.type_vocab_size > 0:
        x += emb["token_type"].astype(jnp.float32)[token_type_ids]
    if "proj" in emb:
        x = _mm("bte,eh->bth", x, emb["proj"], dtype)
    h = _layer_norm(x, emb["norm"], c.layer_norm_eps) * valid[..., None]
    rel = rel_emb = None
    if c.relative_attention:
        rel = jnp.asarray(log_bucket_table(c, t))[pos[:, :, None] - pos[:, None, :] + t - 1]
        rel_emb = params["rel_embeddings"]
        rel_emb = _layer_norm(rel_emb, params["rel_norm"], c.layer_norm_eps) if c.norm_rel_ebd else rel_emb

    def step(h, p):
        return _layer(c, p, h, valid, rel, rel_emb), None

    h, _ = jax.lax.scan(step, h, params["layers"])
    first = jnp.argmax(valid, axis=1)
    pooled = jnp.take_along_axis(h, first[:, None, None], axis=1)[:, 0]
    pooled = ACTIVATIONS[c.pooler_hidden_act](_dense(pooled, params["pooler"], dtype))
    return _dense(pooled, params["classifier"], jnp.float32)[:, 0]
