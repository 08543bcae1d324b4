"""Reward models: a scalar ``score`` head on the same decoder, loaded from an HF ``*ForSequenceClassification``
folder (Llama / Mistral / Qwen2 / Gemma).

    rm, tokenizer = load_reward_model("path/to/rm")
    scores = rm(input_ids, attention_mask)          # [B] float32

The score is the head applied to the final hidden state of each row's **last real token** — the last position
where ``attention_mask`` is 1 — with RoPE positions ``cumsum(mask) − 1`` and attention restricted to real
tokens. So a row scores the same however it is padded: right padding, left padding, or the online loop's
left-padded prompt followed by a right-padded response. (HF transformers picks the last token that is not
``pad_token_id`` and, unless given ``position_ids``, counts positions from the first column, so HF matches this
only on right-padded rows; the tests compare against HF on unpadded rows.)

DeBERTa reward models (the paper's OpenAssistant RM) are out of scope: DeBERTa is a bidirectional encoder with
disentangled relative-position attention, a different architecture from the decoder here, and keeping one
decoder is what lets the annotator share the policy's sharding, jit and TPU path. Decoder RMs
(Llama / Qwen2 / Gemma ``*ForSequenceClassification``, e.g. Gemma-2B RMs) cover paper-scale annotation.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from bpo_jax import distributed
from bpo_jax.models.config import ModelConfig
from bpo_jax.models.decoder import hidden_states
from bpo_jax.models.loading import open_hf_folder, read_params

SCORE_TENSOR = "score.weight"


@dataclasses.dataclass(frozen=True)
class RewardModel:
    """A decoder body plus a scalar head: ``params`` is the decoder's pytree (no LM head) with ``score [D]``."""

    config: ModelConfig
    params: dict
    mesh: object = None

    def __call__(self, input_ids, attention_mask) -> np.ndarray:
        """``[B]`` float32 scores of this host's rows (with several processes, every host calls it with the same
        shapes, each with its own rows)."""
        ids = np.asarray(input_ids, np.int32)
        mask = np.asarray(attention_mask, np.int32)
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise ValueError(f"input_ids and attention_mask must both be [B, T]; got {ids.shape}, {mask.shape}")
        if np.any(mask.sum(axis=1) == 0):
            raise ValueError("every row needs at least one real token (a row of attention_mask is all 0)")
        ids_d, mask_d = distributed.global_rows((ids, mask), self.mesh)
        return distributed.local_rows(reward_scores(self.config, self.params, ids_d, mask_d))


@functools.partial(jax.jit, static_argnums=0)
def reward_scores(config: ModelConfig, params: dict, input_ids, attention_mask) -> jax.Array:
    """``[B]`` float32 scores: the head on the final hidden state of each row's last real token."""
    h, _ = hidden_states(config, params, input_ids, attention_mask=attention_mask)
    t = input_ids.shape[1]
    last = (t - 1) - jnp.argmax(attention_mask[:, ::-1], axis=1)
    h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
    return jnp.einsum("bd,d->b", h_last.astype(jnp.float32), params["score"].astype(jnp.float32))


def load_reward_model(path: str, *, mesh=None, rules=None, param_dtype: str = "float32", dtype: str = "auto"):
    """``(RewardModel, tokenizer)`` from an HF ``*ForSequenceClassification`` folder with one label.

    The tokenizer (None when the folder has none) is the RM's own: annotators apply its chat template, so the RM
    need not share the policy's tokenizer. ``mesh``/``rules`` shard the weights as for the policy.
    """
    if dtype == "auto":
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    cfg_file = os.path.join(path, "config.json")
    if os.path.isfile(cfg_file):
        with open(cfg_file) as f:
            hf = json.load(f)
        arch = ",".join(hf.get("architectures") or [])
        if arch and "ForSequenceClassification" not in arch:
            raise ValueError(f"{path!r} holds {arch}, not a *ForSequenceClassification reward model")
        labels = hf.get("num_labels", len(hf.get("id2label") or {}) or None)
        if labels is not None and labels != 1:
            raise ValueError(f"{path!r} has num_labels={labels}; a reward model needs a single scalar score "
                             f"(num_labels=1)")
    config, tensors, tokenizer = open_hf_folder(path, param_dtype=param_dtype, dtype=dtype, remat=False)
    if SCORE_TENSOR not in tensors:
        raise ValueError(f"{path!r} has no {SCORE_TENSOR!r} tensor; is it a *ForSequenceClassification folder?")
    score_view = tensors[SCORE_TENSOR]
    shape = tuple(score_view.get_shape())
    if shape != (1, config.hidden_size):
        raise ValueError(f"tensor {SCORE_TENSOR!r} has shape {shape}, expected (1, {config.hidden_size})")
    # The body has no LM head; reading it as a tied-embedding decoder skips lm_head (never used for scoring).
    config = dataclasses.replace(config, tie_word_embeddings=True)
    params = read_params(config, tensors, mesh=mesh, rules=rules)
    score = np.asarray(score_view[:, :], np.dtype(param_dtype))[0]
    if mesh is not None:
        score = jax.device_put(score, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    params["score"] = jnp.asarray(score)
    return RewardModel(config, params, mesh), tokenizer
