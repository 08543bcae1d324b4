"""Token and sequence log-probabilities from logits, reduced over a response mask.

Memory: a naive ``jax.nn.log_softmax(logits.astype(f32)[:, :-1])`` followed by a gather materialises two
float32 ``[B, T, V]`` arrays in the forward pass (the shifted slice and the log-softmax). Here the log-prob of
the target token is ``logits[target] − logsumexp(logits)``, with the targets shifted instead of the logits:
the gather reads the logits in their own dtype and the logsumexp is two single-pass reductions, so for
float32 logits the forward builds no ``[B, T, V]`` temporary at all. (For bfloat16 logits XLA's CPU backend
makes one float32 copy to do the arithmetic; accelerators fuse the upcast into the reductions. The backward
of logsumexp is a softmax and needs one ``[B, T, V]`` buffer.)

For training, ``chunked_token_logprobs`` goes further: it unembeds the hidden states a few positions at a time
inside a ``lax.map`` whose body is rematerialised, so neither the forward nor the backward ever holds the logits
of more than one chunk (``[B, chunk, V]``); the backward recomputes each chunk's logits (one extra unembedding
matmul) instead of keeping ``[B, T, V]`` buffers alive between the passes.

Convention: ``logits[:, t]`` predicts ``tokens[:, t + 1]`` (a causal LM's output over the input sequence).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


def _logsumexp_f32(logits: Array) -> Array:
    """float32 logsumexp over the last axis as two single-pass reductions over the original logits.

    The max is taken in the logits' own dtype (exact) and held outside the gradient (the total derivative of
    logsumexp w.r.t. the shift is zero, so the gradient is still the softmax); the float32 upcast then lives
    only inside the fused exp-sum reduction instead of in a materialised float32 copy.
    """
    shift = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)).astype(jnp.float32)
    total = jnp.sum(jnp.exp(logits.astype(jnp.float32) - shift), axis=-1)
    return jnp.log(total) + shift[..., 0]


def token_logprobs(logits: Array, targets: Array) -> Array:
    """``log softmax(logits)[..., target]`` in float32 for logits ``[..., V]`` and int targets ``[...]``."""
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked.astype(jnp.float32) - _logsumexp_f32(logits)


def chunked_token_logprobs(unembed, params, hidden: Array, targets: Array, chunk: int) -> Array:
    """``token_logprobs(unembed(params, hidden), targets)`` for ``hidden [B, T, D]``, ``targets [B, T]``, computed
    ``chunk`` positions at a time: ``unembed(params, h [B, c, D]) -> logits [B, c, V]``. Each chunk's logits are
    rematerialised in the backward pass, so at most one chunk's ``[B, chunk, V]`` logits exist at once. Equal to
    the unchunked value (the same arithmetic per position); ``chunk <= 0`` or ``>= T`` is the unchunked path."""
    b, t, d = hidden.shape
    if chunk <= 0 or chunk >= t:
        return token_logprobs(unembed(params, hidden), targets)
    n = -(-t // chunk)
    pad = n * chunk - t
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
    tg = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(p, h_i, t_i):
        return token_logprobs(unembed(p, h_i), t_i)

    out = jax.lax.map(lambda xs: one(params, *xs), (h, tg))  # [n, B, chunk]
    return out.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]


class SequenceLogprobs(NamedTuple):
    """Masked reductions of per-token log-probs: ``sum`` and ``mean`` over the mask, and the token ``count``."""

    sum: Array
    mean: Array
    count: Array


def reduce_masked(token_logps: Array, mask: Array) -> SequenceLogprobs:
    """Sum and mean of ``token_logps [..., T]`` over ``mask [..., T]`` (the mean of an empty mask is 0)."""
    m = mask.astype(jnp.float32)
    total = jnp.sum(token_logps.astype(jnp.float32) * m, axis=-1)
    count = jnp.sum(m, axis=-1)
    return SequenceLogprobs(total, total / jnp.maximum(count, 1.0), count)


def sequence_logprobs(logits: Array, tokens: Array, loss_mask: Array) -> SequenceLogprobs:
    """Response log-probs of ``tokens [B, T]`` under a causal LM's ``logits [B, T, V]``.

    ``loss_mask [B, T]`` marks the tokens to score (the response, not the prompt or padding). Position t is
    scored with ``logits[:, t − 1]``; the first position can never be scored.
    """
    # Shift the (small) targets rather than slicing the (large) logits, which would copy [B, T−1, V].
    next_tokens = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
    token_logps = token_logprobs(logits, next_tokens)[:, :-1]
    return reduce_masked(token_logps, loss_mask[:, 1:])
