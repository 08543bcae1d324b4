"""The jitted SFT step, ``new_state, metrics = step(state, batch)``, and the held-out loss.

A batch holds B rows laid out as ``bpo_jax.data.sft`` encodes them: a left-padded prompt of P slots, then a
right-padded response of N slots:

  ``ids``, ``mask``   int32 [B, P + N]  (``mask`` 1 on real prompt and response tokens)
  ``prompt_len``      static: P (only positions ≥ P carry loss)

The loss is the mean negative log-likelihood over the batch's response tokens,

    L = − Σ_{b,j} m_bj log π(y_bj | x_b, y_b,<j) / Σ_{b,j} m_bj     (m: the response mask),

so a prompt token's prediction never enters it: TRL's completion-only collator labels the prompt −100 and the
causal-LM loss averages over the labelled tokens (official ``train/sft_train.py``, line 135). ``micro_batches``
split the batch inside the step; each adds its share of the numerator and divides by the whole batch's count, so
the loss and its gradient do not depend on them. The state is ``bpo_jax.train.state.TrainState`` with one member
(N = 1); the update is the run's optimizer (``cfg.optimizer.build(T)``) on the float32 master weights or LoRA
factors (``state.adapter_params``: the adapter attached in activation space). Only the response positions are
unembedded (``logprob_chunk`` at a time when > 0).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import optax

from bpo_jax.config import StepConfig, TrainConfig
from bpo_jax.logprobs import chunked_token_logprobs
from bpo_jax.models.config import ModelConfig
from bpo_jax.models.decoder import hidden_states, logits_from_hidden
from bpo_jax.train import state as st
from bpo_jax.train.step import jit_state_step

BATCH_KEYS = ("ids", "mask")


def response_nll(model_config: ModelConfig, params, ids, mask, prompt_len: int, chunk: int = 0):
    """``(Σ −log π(response token), response token count)`` over rows ``[prompt | response]``: position
    P − 1 + j predicts response token j."""
    h, _ = hidden_states(model_config, params, ids, attention_mask=mask)
    lp = chunked_token_logprobs(partial(logits_from_hidden, model_config), params, h[:, prompt_len - 1 : -1],
                                ids[:, prompt_len:], chunk)
    m = mask[:, prompt_len:].astype(jnp.float32)
    return -jnp.sum(lp * m), jnp.sum(m)


def _micro(batch, m: int):
    return jax.tree.map(lambda x: x.reshape(m, x.shape[0] // m, *x.shape[1:]), batch)


def sft_step(cfg: StepConfig, model_config: ModelConfig, state: st.TrainState, batch: dict, *, prompt_len: int):
    """One optimizer step on ``batch`` (un-jitted; see ``make_sft_step``); metrics: ``loss``, ``grad_norm``,
    ``learning_rate``, ``tokens`` (the batch's response tokens)."""
    optimizer = st.make_optimizer(cfg)
    micro = _micro({k: batch[k] for k in BATCH_KEYS}, cfg.micro_batches)
    tokens = jnp.maximum(jnp.sum(batch["mask"][:, prompt_len:]).astype(jnp.float32), 1.0)
    train_i, opt_i = jax.tree.map(lambda x: x[0], (state.trainable, state.opt_state))

    def loss_fn(train, mb):
        params = st.adapter_params(cfg, state.base, train)
        return response_nll(model_config, params, mb["ids"], mb["mask"], prompt_len, cfg.logprob_chunk)[0] / tokens

    def accumulate(acc, mb):
        loss, g = jax.value_and_grad(loss_fn)(train_i, mb)
        return jax.tree.map(jnp.add, acc, (g, loss)), None

    (grads, loss), _ = jax.lax.scan(accumulate, (jax.tree.map(jnp.zeros_like, train_i), jnp.float32(0)), micro)
    updates, opt_i = optimizer.update(grads, opt_i, train_i)
    trainable, opt_state = jax.tree.map(lambda x: x[None], (optax.apply_updates(train_i, updates), opt_i))
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "tokens": tokens,
               "learning_rate": cfg.optimizer.schedule(cfg.total_steps)(state.step)}
    return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics


def make_sft_step(cfg: TrainConfig | StepConfig, model_config: ModelConfig, state_shardings, *, prompt_len: int,
                  batch_sharding=None):
    """``sft_step`` jitted as the DAP step is (``bpo_jax.train.step.jit_state_step``: explicit shardings, the
    state donated but for the frozen base weights, the run's numerics)."""
    return jit_state_step(sft_step, cfg, model_config, state_shardings, prompt_len=prompt_len,
                          batch_sharding=batch_sharding)


@partial(jax.jit, static_argnames=("model_config", "prompt_len", "micro_batches", "chunk"))
def heldout_nll(model_config: ModelConfig, params, batch: dict, *, prompt_len: int, micro_batches: int = 1,
                chunk: int = 0):
    """``[2]``: (Σ response NLL, response tokens) of ``batch`` under ``params`` (the model as evaluated), in
    ``micro_batches`` forwards; the held-out loss is the first over the second, summed over batches."""
    sums = jax.lax.map(lambda mb: jnp.stack(response_nll(model_config, params, mb["ids"], mb["mask"], prompt_len,
                                                         chunk)), _micro({k: batch[k] for k in BATCH_KEYS},
                                                                         micro_batches))
    return jnp.sum(sums, axis=0)
