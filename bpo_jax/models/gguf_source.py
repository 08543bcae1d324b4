"""GGUF import (llama-architecture files such as the shipped SmolLM2): config, dequantised tensors, tokenizer
(``gguf_tokenizer``).

GGUF stores shapes reversed relative to NumPy and, for llama models, llama.cpp's converter permutes the rows
of ``attn_q``/``attn_k`` (per head: the two rotary halves interleaved); ``unpermute`` undoes that so the
tensors match the HF layout. Tensors are dequantised with the ``gguf`` package when first read.
"""

from __future__ import annotations

import numpy as np

from bpo_jax.models.config import ModelConfig

_GGUF_TO_HF = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (HF rotate-half order → interleaved pairs), for tests and reference."""
    out = w.shape[0]
    return w.reshape(n_heads, 2, out // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of ``permute``: GGUF q/k rows back to the HF rotate-half order."""
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(gguf_name: str) -> str:
    if gguf_name in _TOP:
        return _TOP[gguf_name]
    parts = gguf_name.split(".")  # blk.{i}.{kind}.{weight|bias}
    if len(parts) != 4 or parts[0] != "blk" or parts[2] not in _GGUF_TO_HF:
        raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")
    return f"model.layers.{parts[1]}.{_GGUF_TO_HF[parts[2]]}.{parts[3]}"


class _GGUFTensors:
    """name (HF) → dequantised float32 NumPy array in HF layout, dequantised on first access."""

    def __init__(self, reader, n_heads: int, n_kv_heads: int):
        self._by_name = {hf_name(t.name): t for t in reader.tensors}
        self._heads = {"q_proj": n_heads, "k_proj": n_kv_heads}
        self._cache: dict[str, np.ndarray] = {}

    def __contains__(self, name):
        return name in self._by_name

    def __getitem__(self, name):
        if name not in self._cache:
            from gguf.quants import dequantize

            t = self._by_name[name]
            w = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(tuple(reversed(t.shape.tolist())))
            proj = name.split(".")[-2]
            if proj in self._heads:
                w = unpermute(w, self._heads[proj])
            self._cache[name] = w
        return self._cache[name]


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def open_gguf(path: str, **numerics):
    """``(ModelConfig, tensors, tokenizer)`` for a llama-architecture GGUF file."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as err:  # the gguf package raises assorted errors on a corrupt or non-GGUF file
        raise ValueError(f"{path!r} is not a readable GGUF file: {err}") from err
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (only 'llama'); convert the model to an HF "
                         f"folder instead")
    names = {t.name for t in reader.tensors}
    heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    hf = {
        "model_type": "llama",
        "vocab_size": int(_field(reader, "llama.vocab_size", len(tokens))),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, "llama.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }
    config = ModelConfig.from_hf(hf, **numerics)
    tensors = _GGUFTensors(reader, config.num_heads, config.num_kv_heads)
    from bpo_jax.models.gguf_tokenizer import tokenizer_from_gguf

    return config, tensors, tokenizer_from_gguf(lambda key, default=None: _field(reader, key, default))
