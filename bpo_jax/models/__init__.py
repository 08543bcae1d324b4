"""Decoder models (Llama / Qwen2 / Qwen3 / Gemma 1-3) in JAX + Flax NNX, with HF/GGUF import and HF export, the
LoRA ensemble they apply (``lora``) and its PEFT folders (``peft_adapters``), and reward models (those decoders
with a score head, or DeBERTa-v2/v3)."""

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
from bpo_jax.models.reward import DebertaRewardModel, RewardModel, load_reward_model

__all__ = ["SUPPORTED", "ModelConfig", "Decoder", "forward", "hidden_states", "unembed", "logits_from_hidden",
           "init_cache", "init_params", "param_axes", "param_shapes", "unstack_layers", "load_pretrained",
           "save_pretrained", "RewardModel", "DebertaRewardModel", "load_reward_model"]
