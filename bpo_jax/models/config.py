"""``ModelConfig``: the architecture of one decoder, read from an HF ``config.json`` or GGUF metadata.

One config-driven decoder covers Llama (2/3, with Llama-3 RoPE scaling; SmolLM2; Mistral-style GQA), Qwen2 /
Qwen2.5 (q/k/v bias), Qwen3 dense (per-head q/k RMSNorm), Gemma 1 (GeGLU, (1 + w) RMSNorm, √d embedding scale,
tied embeddings), Gemma 2 (post-attention / post-MLP norms, attention and final-logit softcapping, sliding-window
layers, ``query_pre_attn_scalar``) and text-only Gemma 3 (Gemma 2 plus (1 + w) q/k norms and a second RoPE base
for the local layers). The config is a frozen, hashable dataclass so it can be a static argument of ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from bpo_jax.models.numerics import ATTENTION_IMPLS, remat_policy

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
_GEMMAS = ("gemma", "gemma2", "gemma3_text")
_ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
          "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
          "gemma3_text": "Gemma3ForCausalLM"}
# model_types we know and refuse, with why.
_REFUSED = {
    "qwen3_moe": "Qwen3 mixture-of-experts (qwen3_moe) is not supported; only dense Qwen3 (model_type 'qwen3')",
    "qwen2_moe": "Qwen2 mixture-of-experts (qwen2_moe) is not supported; only dense Qwen2 (model_type 'qwen2')",
    "mixtral": "Mixtral mixture-of-experts is not supported",
    "gemma3": "Gemma 3 multimodal checkpoints (Gemma3ForConditionalGeneration, model_type 'gemma3', with a vision "
              "tower) are not supported; only text-only Gemma3ForCausalLM checkpoints (model_type 'gemma3_text')",
}
# HF activation name -> ours. Gemma checkpoints name the tanh approximation "gelu" (a legacy value HF maps to
# gelu_pytorch_tanh for Gemma 1 only); elsewhere "gelu" is the exact erf form.
_ACTS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
_HF_ACTS = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}
_ROPE_TYPES = ("default", "llama3", "linear")
FULL, SLIDING = "full_attention", "sliding_attention"




@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Llama-3 / linear RoPE scaling as a sorted tuple of (key, value) pairs (hashable), or () for none.
    rope_scaling: tuple = ()
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"  # "silu" | "gelu_tanh" | "gelu" (exact)
    # Gemma: RMSNorm scales by (1 + w) and the embeddings are multiplied by √hidden_size.
    norm_plus_one: bool = False
    scale_embeddings: bool = False
    # Qwen3 / Gemma 3: RMSNorm over head_dim of each query and key head, before RoPE.
    qk_norm: bool = False
    # Gemma 2/3: norms on the attention output and the MLP output too (before each residual add).
    sandwich_norms: bool = False
    # Attention scores are scaled by query_pre_attn_scalar ** -0.5 (Gemma 2/3) instead of head_dim ** -0.5.
    query_pre_attn_scalar: float | None = None
    # cap · tanh(x / cap) on the scaled attention scores (before the mask) and on the final logits.
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    # Per layer "full_attention" | "sliding_attention" (() = all full); a sliding layer's query attends to the
    # keys q − k < sliding_window positions back (itself included), as HF's sliding-window mask.
    layer_types: tuple = ()
    sliding_window: int | None = None
    # Gemma 3: RoPE base and scaling of the sliding layers (None: the sliding layers use the global RoPE).
    rope_local_theta: float | None = None
    rope_local_scaling: tuple = ()
    bos_token_id: int | None = None
    eos_token_id: int | tuple | None = None
    pad_token_id: int | None = None
    # Numerics (not part of the HF architecture): parameter and compute dtypes, per-layer rematerialisation
    # ("none", "full": keep each layer's input only, "dots": keep its matmul outputs, recompute the rest), and
    # the attention of full-sequence forwards ("xla": XLA-compiled, any backend; "cudnn": cuDNN's fused flash
    # attention on NVIDIA GPUs, which keeps no score matrix for the backward; cached decoding always uses xla).
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    attention: str = "xla"

    def __post_init__(self):
        object.__setattr__(self, "remat", remat_policy(self.remat))
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention={self.attention!r}; valid: {', '.join(ATTENTION_IMPLS)}")
        if self.attention == "cudnn" and self.dtype not in ("bfloat16", "float16"):
            raise ValueError(f"attention=cudnn needs a bfloat16 or float16 compute dtype (cuDNN's fused "
                             f"attention has no float32 kernel); dtype is {self.dtype}")
        if self.attention == "cudnn" and self.attn_logit_softcapping is not None:
            raise ValueError("attention=cudnn cannot softcap attention logits (Gemma 2); use attention=xla")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def has_sliding(self) -> bool:
        return self.sliding_window is not None and SLIDING in self.layer_types

    @property
    def has_local_rope(self) -> bool:
        return self.has_sliding and self.rope_local_theta is not None

    def layer_windows(self):
        """Per-layer attention window ``[layers]`` (int32 NumPy): ``sliding_window`` for sliding layers, a
        value larger than any sequence for full ones. Scanned alongside the stacked layer weights."""
        import numpy as np

        big = np.iinfo(np.int32).max
        return np.array([self.sliding_window if t == SLIDING else big
                         for t in (self.layer_types or (FULL,) * self.num_layers)], np.int32)

    def layer_is_local(self):
        """Per-layer flag ``[layers]`` (bool NumPy): whether the layer uses the local RoPE table."""
        import numpy as np

        return np.array([t == SLIDING for t in (self.layer_types or (FULL,) * self.num_layers)], bool)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **numerics) -> "ModelConfig":
        """Build from an HF ``config.json`` dict (older top-level ``rope_theta``/``rope_scaling`` (and Gemma 3's
        ``rope_local_base_freq``) or the transformers-5 ``rope_parameters`` form, flat or per layer type).
        ``numerics`` sets ``param_dtype``/``dtype``/``remat``/``attention``."""
        mt = hf.get("model_type")
        _check_supported(hf, mt)
        n_layers = hf["num_hidden_layers"]
        theta, scaling, local_theta, local_scaling = _read_rope(hf, mt)
        layer_types, window = _layer_pattern(hf, mt, n_layers)
        heads = hf["num_attention_heads"]
        act = _activation(hf, mt)
        eos = hf.get("eos_token_id")
        default_head_dim = 256 if mt in _GEMMAS else 128 if mt == "qwen3" else hf["hidden_size"] // heads
        g23 = mt in ("gemma2", "gemma3_text")
        return cls(
            model_type=mt,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=n_layers,
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            # HF Gemma defaults head_dim to 256 and Qwen3 to 128 (not hidden/heads) when config.json leaves it out.
            head_dim=hf.get("head_dim") or default_head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 8192),
            tie_word_embeddings=hf.get("tie_word_embeddings", mt in _GEMMAS),
            attention_bias=mt == "qwen2" or bool(hf.get("attention_bias", False)),
            hidden_act=act,
            norm_plus_one=mt in _GEMMAS,
            scale_embeddings=mt in _GEMMAS,
            qk_norm=mt in ("qwen3", "gemma3_text"),
            sandwich_norms=g23,
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256) if g23 else None,  # HF types it int
            # HF's Gemma 3 attention does not apply attn_logit_softcapping (only Gemma 2 does); match it.
            attn_logit_softcapping=_opt_float(hf.get("attn_logit_softcapping", 50.0)) if mt == "gemma2" else None,
            final_logit_softcapping=_opt_float(hf.get("final_logit_softcapping", 30.0 if mt == "gemma2" else None))
            if g23 else None,
            layer_types=layer_types,
            sliding_window=window if SLIDING in layer_types else None,
            rope_local_theta=float(local_theta) if mt == "gemma3_text" else None,
            rope_local_scaling=local_scaling if mt == "gemma3_text" else (),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"),
            **numerics,
        )

    def to_hf(self) -> dict[str, Any]:
        """The HF ``config.json`` dict for this architecture (as transformers' ``*ForCausalLM`` classes read it)."""
        out = {
            "model_type": self.model_type,
            "architectures": [_ARCHS[self.model_type]],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) or None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": _HF_ACTS[self.hidden_act],
            "dtype": self.param_dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type == "llama":
            out["attention_bias"] = self.attention_bias
            out["mlp_bias"] = False
        if self.model_type in ("qwen3", "gemma2", "gemma3_text"):
            out["attention_bias"] = False
        if self.model_type == "qwen3":
            out["use_sliding_window"] = False
        if self.model_type in _GEMMAS:
            out["hidden_activation"] = out["hidden_act"]
        if self.model_type in ("gemma2", "gemma3_text"):
            layer_types = self.layer_types or (FULL,) * self.num_layers
            # A config with no sliding layers still needs a window value for HF (unused).
            out.update(query_pre_attn_scalar=self.query_pre_attn_scalar, layer_types=list(layer_types),
                       sliding_window=self.sliding_window or 4096,
                       final_logit_softcapping=self.final_logit_softcapping,
                       attn_logit_softcapping=self.attn_logit_softcapping, use_bidirectional_attention=False)
        if self.model_type == "gemma3_text":
            local = self.rope_local_theta if self.rope_local_theta is not None else self.rope_theta
            # Both forms: transformers 5 reads rope_parameters, 4.x the top-level keys.
            out["rope_local_base_freq"] = local
            out["rope_parameters"] = {FULL: {"rope_type": "default", "rope_theta": self.rope_theta,
                                             **dict(self.rope_scaling)},
                                      SLIDING: {"rope_type": "default", "rope_theta": local,
                                                **dict(self.rope_local_scaling)}}
        return out

    def rope_inv_freq(self, local: bool = False):
        """RoPE inverse frequencies ``[head_dim/2]`` (float64 NumPy), with Llama-3 or linear scaling applied;
        ``local``: those of the sliding layers (Gemma 3's ``rope_local_base_freq``)."""
        if local and self.rope_local_theta is not None:
            return _inv_freq(self.rope_local_theta, self.rope_local_scaling, self.head_dim)
        return _inv_freq(self.rope_theta, self.rope_scaling, self.head_dim)


def _opt_float(x):
    return None if x is None else float(x)


def _inv_freq(theta: float, scaling: tuple, head_dim: int):
    import numpy as np

    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    s = dict(scaling)
    kind = s.get("rope_type", s.get("type"))
    if kind == "linear":
        inv = inv / s["factor"]
    elif kind == "llama3":
        factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * inv / factor + smooth * inv
        inv = np.where(wavelen > old / lo, inv / factor, np.where(wavelen < old / hi, inv, smoothed))
    return inv


def _rope_entry(params: dict, default_theta: float, where: str = ""):
    """``(theta, scaling tuple)`` from one RoPE dict (``rope_theta`` plus scaling keys), refusing what we lack."""
    params = dict(params)
    theta = params.pop("rope_theta", default_theta)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ValueError(f"unsupported RoPE scaling {rope_type!r}{where}; supported: {', '.join(_ROPE_TYPES)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial rotary embeddings (partial_rotary_factor={params['partial_rotary_factor']}) "
                         f"are not supported")
    params.pop("partial_rotary_factor", None)
    scaling = () if rope_type == "default" else tuple(sorted((k, v) for k, v in params.items()
                                                             if k != "type" and not isinstance(v, list)))
    return theta, scaling



def _check_supported(hf: dict, mt) -> None:
    """Refuse a config.json whose architecture or attention variant the decoder does not implement."""
    if mt in _REFUSED:
        raise ValueError(_REFUSED[mt])
    if mt not in SUPPORTED:
        raise ValueError(f"unsupported model_type {mt!r}; bpo_jax supports: {', '.join(SUPPORTED)}")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    if missing:
        raise ValueError(f"config.json lacks required keys: {', '.join(missing)}")
    if hf.get("num_experts") or hf.get("num_local_experts"):
        raise ValueError(f"mixture-of-experts {mt} checkpoints are not supported")
    if mt == "qwen2" and hf.get("use_sliding_window"):
        raise ValueError("Qwen2 sliding-window attention (use_sliding_window=true) is not supported")
    if mt == "qwen3" and hf.get("use_sliding_window"):
        raise ValueError("Qwen3 sliding-window attention (use_sliding_window=true) is not supported")
    if mt == "mistral" and hf.get("sliding_window") is not None:
        raise ValueError(f"Mistral sliding-window attention (sliding_window={hf['sliding_window']}) is not "
                         f"supported; only checkpoints with sliding_window=null")
    if mt in ("gemma2", "gemma3_text") and hf.get("use_bidirectional_attention"):
        raise ValueError(f"{mt} with use_bidirectional_attention=true (an encoder) is not supported")
    if mt in ("qwen3", "gemma2", "gemma3_text") and hf.get("attention_bias"):
        raise ValueError(f"{mt} with attention_bias=true is not supported")
    for key in ("sinks", "attention_sinks", "use_sinks"):
        if hf.get(key):
            raise ValueError(f"attention sinks ({key}) are not supported")


def _layer_pattern(hf: dict, mt: str, n_layers: int) -> tuple[tuple, int | None]:
    """``(layer_types, sliding_window)``: Gemma 2/3's per-layer full/sliding attention; ``((), None)`` elsewhere."""
    layer_types, window = (), None
    if mt in ("gemma2", "gemma3_text"):
        window = hf.get("sliding_window", 4096)
        layer_types = hf.get("layer_types")
        if layer_types is None:  # HF's default pattern: every `pattern`-th layer is global
            pattern = 2 if mt == "gemma2" else hf.get("sliding_window_pattern", 6)
            layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(n_layers)]
        bad = sorted(set(layer_types) - {FULL, SLIDING})
        if bad:
            raise ValueError(f"unsupported layer_types {bad}; supported: {FULL}, {SLIDING}")
        if len(layer_types) != n_layers:
            raise ValueError(f"layer_types has {len(layer_types)} entries for {n_layers} layers")
        if window is None and SLIDING in layer_types:
            raise ValueError("sliding_attention layers need a sliding_window")
        layer_types = tuple(layer_types)
    return layer_types, window


def _activation(hf: dict, mt: str) -> str:
    """The MLP activation in our names (Gemma 1's legacy "gelu" is the tanh approximation)."""
    act = hf.get("hidden_activation") or hf.get("hidden_act") or ("gelu_pytorch_tanh" if mt in _GEMMAS else "silu")
    if act not in _ACTS:
        raise ValueError(f"unsupported activation {act!r}; supported: {', '.join(_ACTS)}")
    return "gelu_tanh" if mt == "gemma" and act == "gelu" else _ACTS[act]


def _read_rope(hf: dict, mt: str):
    """``(theta, scaling, local_theta, local_scaling)`` from either config form. Local values are only
    meaningful for Gemma 3 (``rope_local_base_freq`` or ``rope_parameters["sliding_attention"]``)."""
    rope = dict(hf.get("rope_parameters") or {})
    old = dict(hf.get("rope_scaling") or {})
    if hf.get("partial_rotary_factor", 1.0) not in (None, 1.0):
        raise ValueError(f"partial rotary embeddings (partial_rotary_factor={hf['partial_rotary_factor']}) are not "
                         f"supported")
    g_theta = 1_000_000.0 if mt == "gemma3_text" else 10000.0
    l_theta = hf.get("rope_local_base_freq", 10000.0)
    if FULL in rope or SLIDING in rope:  # transformers-5 per-layer-type form
        full = {**old, **(rope.get(FULL) or {})}
        theta, scaling = _rope_entry(full, hf.get("rope_theta", g_theta), f" ({FULL})")
        local_theta, local_scaling = _rope_entry(rope.get(SLIDING) or {}, l_theta, f" ({SLIDING})")
        return theta, scaling, local_theta, local_scaling
    merged = {**old, **rope}
    theta, scaling = _rope_entry(merged, rope.get("rope_theta", hf.get("rope_theta", old.get("rope_theta", g_theta))))
    # Older Gemma 3 configs: rope_scaling applies to the global layers only; the local ones are unscaled.
    return theta, scaling, l_theta, ()
