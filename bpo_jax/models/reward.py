"""Reward models: a scalar head on a transformer, loaded from an HF ``*ForSequenceClassification`` folder with one
label — the decoders here (Llama / Mistral / Qwen2 / Gemma) or DeBERTa-v2/v3 (``model_type`` ``deberta-v2``,
e.g. the paper's OpenAssistant ``reward-model-deberta-v3-large-v2``; see ``bpo_jax.models.deberta``).

    rm, tokenizer = load_reward_model("path/to/rm")
    scores = rm(input_ids, attention_mask)          # [B] float32

A decoder RM's score is the head applied to the final hidden state of each row's **last real token** — the last
position where ``attention_mask`` is 1 — with RoPE positions ``cumsum(mask) − 1`` and attention restricted to
real tokens. So a row scores the same however it is padded: right padding, left padding, or the online loop's
left-padded prompt followed by a right-padded response. (HF transformers picks the last token that is not
``pad_token_id`` and, unless given ``position_ids``, counts positions from the first column, so HF matches this
only on right-padded rows; the tests compare against HF on unpadded rows.)

A DeBERTa RM (``DebertaRewardModel``) is a bidirectional encoder scored on its first real token (``[CLS]``); it
reads a (prompt, response) **text pair** — ``tokenizer(prompt, response)``, with ``token_type_ids`` — rather
than a chat template, so it has ``text_pair = True`` and takes ``rm(input_ids, attention_mask,
token_type_ids)``. Its positions are ``cumsum(mask) − 1`` too, so it gives HF's scores on right-padded rows (what
tokenizers produce) and the same score under any padding.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from bpo_jax.models import deberta
from bpo_jax.models.config import ModelConfig
from bpo_jax.models.decoder import hidden_states
from bpo_jax.models.hub import resolve_model
from bpo_jax.models.loading import open_hf_folder, read_params
from bpo_jax.runtime import distributed

SCORE_TENSOR = "score.weight"


@dataclasses.dataclass(frozen=True)
class RewardModel:
    """A decoder body plus a scalar head: ``params`` is the decoder's pytree (no LM head) with ``score [D]``."""

    config: ModelConfig
    params: dict
    mesh: object = None
    text_pair: ClassVar[bool] = False  # annotators render a chat template, not a (prompt, response) text pair

    def __call__(self, input_ids, attention_mask) -> np.ndarray:
        """``[B]`` float32 scores of this host's rows (with several processes, every host calls it with the same
        shapes, each with its own rows)."""
        rows = distributed.agreed(_host_rows, input_ids, attention_mask)  # bad rows on one host stop every host
        ids_d, mask_d = distributed.global_rows(rows, self.mesh)
        return distributed.local_rows(reward_scores(self.config, self.params, ids_d, mask_d), self.mesh)


@dataclasses.dataclass(frozen=True)
class DebertaRewardModel:
    """A DeBERTa-v2/v3 sequence classifier with one label (``bpo_jax.models.deberta``)."""

    config: deberta.DebertaConfig
    params: dict
    mesh: object = None
    text_pair: ClassVar[bool] = True  # annotators encode ``tokenizer(prompt, response)`` with token types

    def __call__(self, input_ids, attention_mask, token_type_ids=None) -> np.ndarray:
        """``[B]`` float32 scores of this host's rows; ``token_type_ids`` (default 0) mark the text pair's second
        segment (ignored by checkpoints with ``type_vocab_size`` 0, such as DeBERTa-v3). Rows one host cannot
        score stop every host with the same error, before the collective."""
        rows = distributed.agreed(self._checked_rows, input_ids, attention_mask, token_type_ids)
        return distributed.local_rows(deberta.deberta_scores(self.config, self.params,
                                                             *distributed.global_rows(rows, self.mesh)), self.mesh)

    def _checked_rows(self, input_ids, attention_mask, token_type_ids):
        ids, mask = _host_rows(input_ids, attention_mask)
        types = np.zeros_like(ids) if token_type_ids is None else np.asarray(token_type_ids, np.int32)
        if types.shape != ids.shape:
            raise ValueError(f"token_type_ids must be [B, T] like input_ids {ids.shape}; got {types.shape}")
        if self.config.type_vocab_size and (types.min() < 0 or types.max() >= self.config.type_vocab_size):
            raise ValueError(f"token_type_ids must lie in [0, type_vocab_size={self.config.type_vocab_size})")
        longest, limit = int(mask.sum(axis=1).max()), self.config.max_position_embeddings
        if self.config.position_biased_input and longest > limit:
            raise ValueError(f"a row has {longest} tokens, over max_position_embeddings={limit} (this checkpoint "
                             f"has absolute position embeddings)")
        return ids, mask, types


def _host_rows(input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(input_ids, np.int32)
    mask = np.asarray(attention_mask, np.int32)
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise ValueError(f"input_ids and attention_mask must both be [B, T]; got {ids.shape}, {mask.shape}")
    if np.any(mask.sum(axis=1) == 0):
        raise ValueError("every row needs at least one real token (a row of attention_mask is all 0)")
    return ids, mask


@functools.partial(jax.jit, static_argnums=0)
def reward_scores(config: ModelConfig, params: dict, input_ids, attention_mask) -> jax.Array:
    """``[B]`` float32 scores: the head on the final hidden state of each row's last real token."""
    h, _ = hidden_states(config, params, input_ids, attention_mask=attention_mask)
    t = input_ids.shape[1]
    last = (t - 1) - jnp.argmax(attention_mask[:, ::-1], axis=1)
    h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
    return jnp.einsum("bd,d->b", h_last.astype(jnp.float32), params["score"].astype(jnp.float32))


def load_reward_model(path: str, *, mesh=None, rules=None, param_dtype: str = "float32", dtype: str = "auto"):
    """``(RewardModel, tokenizer)`` from an HF ``*ForSequenceClassification`` folder with one label, or
    ``(DebertaRewardModel, tokenizer)`` when its config.json has ``model_type`` ``deberta-v2``. ``path`` may also
    be a Hub id ``org/name[@revision]`` (``bpo_jax.models.hub``).

    The tokenizer (None when the folder has none) is the RM's own: annotators apply its chat template (a text
    pair for DeBERTa), so the RM need not share the policy's tokenizer. ``mesh``/``rules`` shard the weights as
    for the policy.
    """
    if dtype == "auto":
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    path = resolve_model(path)
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
        if hf.get("model_type") == "deberta-v2":
            config, tensors, tokenizer = deberta.open_folder(path, param_dtype=param_dtype, dtype=dtype)
            return DebertaRewardModel(config, deberta.read_params(config, tensors, mesh=mesh, rules=rules),
                                      mesh), tokenizer
    config, tensors, tokenizer = open_hf_folder(path, param_dtype=param_dtype, dtype=dtype, remat="none")
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
