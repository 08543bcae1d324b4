"""Decoder models (Llama / Qwen2 / Gemma) in JAX + Flax NNX, with HF/GGUF import and HF export."""

from bpo_jax.models.config import SUPPORTED, ModelConfig
from bpo_jax.models.decoder import Decoder, forward, init_cache, init_params, param_axes
from bpo_jax.models.export import save_pretrained
from bpo_jax.models.loading import load_pretrained

__all__ = ["SUPPORTED", "ModelConfig", "Decoder", "forward", "init_cache", "init_params", "param_axes",
           "load_pretrained", "save_pretrained"]
