"""Decoder models (Llama / Qwen2 / Gemma) in JAX + Flax NNX, with HF/GGUF import and HF export."""

from bpo_jax.models.config import SUPPORTED, ModelConfig
from bpo_jax.models.decoder import (
                                    Decoder,
                                    forward,
                                    hidden_states,
                                    init_cache,
                                    init_params,
                                    logits_from_hidden,
                                    param_axes,
                                    param_shapes,
                                    unembed,
                                    unstack_layers,
)
from bpo_jax.models.export import save_pretrained
from bpo_jax.models.loading import load_pretrained
from bpo_jax.models.reward import RewardModel, load_reward_model

__all__ = ["SUPPORTED", "ModelConfig", "Decoder", "forward", "hidden_states", "unembed", "logits_from_hidden",
           "init_cache", "init_params", "param_axes", "param_shapes", "unstack_layers", "load_pretrained",
           "save_pretrained", "RewardModel", "load_reward_model"]
