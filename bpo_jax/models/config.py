"""``ModelConfig``: the architecture of one decoder, read from an HF ``config.json`` or GGUF metadata.

One config-driven decoder covers Llama (2/3, with Llama-3 RoPE scaling; SmolLM2; Mistral-style GQA), Qwen2 /
Qwen2.5 (q/k/v bias) and Gemma 1 (GeGLU, (1 + w) RMSNorm, √d embedding scale, tied embeddings). The config is
a frozen, hashable dataclass so it can be a static argument of ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

SUPPORTED = ("llama", "mistral", "qwen2", "gemma")
# HF activation name -> ours. Gemma checkpoints name the tanh approximation "gelu" (a legacy value HF maps to
# gelu_pytorch_tanh for Gemma only); elsewhere "gelu" is the exact erf form.
_ACTS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
_HF_ACTS = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}


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
    bos_token_id: int | None = None
    eos_token_id: int | tuple | None = None
    pad_token_id: int | None = None
    # Numerics (not part of the HF architecture): parameter and compute dtypes, and per-layer rematerialisation.
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: bool = False

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **numerics) -> "ModelConfig":
        """Build from an HF ``config.json`` dict (older top-level ``rope_theta``/``rope_scaling`` or the
        transformers-5 ``rope_parameters`` form). ``numerics`` sets ``param_dtype``/``dtype``/``remat``."""
        mt = hf.get("model_type")
        if mt not in SUPPORTED:
            raise ValueError(f"unsupported model_type {mt!r}; bpo_jax supports: {', '.join(SUPPORTED)}")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in hf]
        if missing:
            raise ValueError(f"config.json lacks required keys: {', '.join(missing)}")
        rope = dict(hf.get("rope_parameters") or {})
        scaling = dict(hf.get("rope_scaling") or {})
        theta = rope.get("rope_theta", hf.get("rope_theta", scaling.get("rope_theta", 10000.0)))
        scaling.update({k: v for k, v in rope.items() if k != "rope_theta"})
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in ("default", "llama3", "linear"):
            raise ValueError(f"unsupported RoPE scaling {rope_type!r}; supported: default, llama3, linear")
        scaling = () if rope_type == "default" else tuple(sorted((k, v) for k, v in scaling.items()
                                                                   if k != "type" and not isinstance(v, list)))
        if mt == "qwen2" and hf.get("use_sliding_window"):
            raise ValueError("Qwen2 sliding-window attention (use_sliding_window=true) is not supported")
        if mt == "mistral" and hf.get("sliding_window") is not None:
            raise ValueError(f"Mistral sliding-window attention (sliding_window={hf['sliding_window']}) is not "
                             f"supported; only checkpoints with sliding_window=null")
        heads = hf["num_attention_heads"]
        act = hf.get("hidden_activation") or hf.get("hidden_act") or ("gelu_pytorch_tanh" if mt == "gemma" else "silu")
        if act not in _ACTS:
            raise ValueError(f"unsupported activation {act!r}; supported: {', '.join(_ACTS)}")
        act = "gelu_tanh" if mt == "gemma" and act == "gelu" else _ACTS[act]
        eos = hf.get("eos_token_id")
        return cls(
            model_type=mt,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            # HF Gemma defaults head_dim to 256 (not hidden/heads) when config.json leaves it out.
            head_dim=hf.get("head_dim") or (256 if mt == "gemma" else hf["hidden_size"] // heads),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 8192),
            tie_word_embeddings=hf.get("tie_word_embeddings", mt == "gemma"),
            attention_bias=mt == "qwen2" or bool(hf.get("attention_bias", False)),
            hidden_act=act,
            norm_plus_one=mt == "gemma",
            scale_embeddings=mt == "gemma",
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"),
            **numerics,
        )

    def to_hf(self) -> dict[str, Any]:
        """The HF ``config.json`` dict for this architecture (as transformers' Llama/Qwen2/Gemma classes read it)."""
        out = {
            "model_type": self.model_type,
            "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                               "qwen2": "Qwen2ForCausalLM", "gemma": "GemmaForCausalLM"}[self.model_type]],
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
        if self.model_type == "gemma":
            out["hidden_activation"] = out["hidden_act"]
        return out

    def rope_inv_freq(self):
        """RoPE inverse frequencies ``[head_dim/2]`` (float64 NumPy), with Llama-3 or linear scaling applied."""
        import numpy as np

        inv = 1.0 / (self.rope_theta ** (np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim))
        s = dict(self.rope_scaling)
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
