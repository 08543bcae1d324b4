"""The one mapping between bpo_jax parameter paths and HF transformers tensor names (Llama/Qwen2/Qwen3/Gemma 1-3).

HF ``nn.Linear`` weights are ``[out, in]``; bpo_jax stores ``[in, out]`` (``x @ w``), so those are transposed.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

from bpo_jax.models.config import ModelConfig
from bpo_jax.models.decoder import param_shapes

_LAYER = {
    "attn_norm": ("input_layernorm.weight", False),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "q": ("self_attn.q_proj.weight", True),
    "k": ("self_attn.k_proj.weight", True),
    "v": ("self_attn.v_proj.weight", True),
    "o": ("self_attn.o_proj.weight", True),
    "q_bias": ("self_attn.q_proj.bias", False),
    "k_bias": ("self_attn.k_proj.bias", False),
    "v_bias": ("self_attn.v_proj.bias", False),
    "gate": ("mlp.gate_proj.weight", True),
    "up": ("mlp.up_proj.weight", True),
    "down": ("mlp.down_proj.weight", True),
    "q_norm": ("self_attn.q_norm.weight", False),
    "k_norm": ("self_attn.k_norm.weight", False),
}
# Gemma 2/3 ("sandwich" norms): HF's post_attention_layernorm is the norm on the attention output, and the norm
# before the MLP (our mlp_norm, Llama's post_attention_layernorm) is pre_feedforward_layernorm.
_SANDWICH = {
    "mlp_norm": ("pre_feedforward_layernorm.weight", False),
    "post_attn_norm": ("post_attention_layernorm.weight", False),
    "post_mlp_norm": ("post_feedforward_layernorm.weight", False),
}
_TOP = {
    "embed": ("model.embed_tokens.weight", False),
    "final_norm": ("model.norm.weight", False),
    "lm_head": ("lm_head.weight", True),
}


def layer_module(key: str) -> str:
    """The HF module path, inside a decoder layer, of the weight ``key`` (``"q"`` -> ``"self_attn.q_proj"``)."""
    return _LAYER[key][0].removesuffix(".weight")


class Entry(NamedTuple):
    """One bpo_jax parameter: its path (``("layers", "q")``), full shape, and the HF tensor names (one per layer
    for stacked parameters) with whether each is stored transposed."""

    path: tuple[str, ...]
    shape: tuple[int, ...]
    hf_names: tuple[str, ...]
    transposed: bool

    @property
    def stacked(self) -> bool:
        """Whether the leaf stacks one HF tensor per layer along a leading ``layers`` axis (even for 1 layer)."""
        return self.path[0] == "layers"


def entries(config: ModelConfig) -> Iterator[Entry]:
    shapes = param_shapes(config)
    for key, shape in shapes.items():
        if key == "layers":
            continue
        name, tr = _TOP[key]
        yield Entry((key,), shape, (name,), tr)
    layer_names = {**_LAYER, **_SANDWICH} if config.sandwich_norms else _LAYER
    for key, shape in shapes["layers"].items():
        suffix, tr = layer_names[key]
        names = tuple(f"model.layers.{i}.{suffix}" for i in range(config.num_layers))
        yield Entry(("layers", key), shape, names, tr)


def get_path(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def set_path(tree: dict, path, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value
