"""Per-step sampling operations: logits → sampling distribution, token draw and log-probs.

Kept apart from the decode loop (``bpo_jax.sample.sampler``) so the maths is small and testable on its own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def sampling_log_probs(logits: Array, *, temperature: float, top_k: int = 0, top_p: float = 1.0) -> Array:
    """Log-probs ``[B, V]`` of the distribution actually sampled from, after temperature, top-k and top-p.

    ``temperature == 0`` is greedy: a point mass on the argmax (log-prob 0 there, −inf elsewhere). Top-k keeps
    the k largest logits; top-p keeps the smallest set of most likely tokens whose probability reaches p (the
    most likely token is always kept). Removed tokens get −inf; the rest are renormalised.
    """
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        best = jnp.argmax(logits, axis=-1)
        return jnp.where(jax.nn.one_hot(best, logits.shape[-1], dtype=bool), 0.0, -jnp.inf)
    scaled = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(scaled, top_k)[0][..., -1:]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    if top_p < 1.0:
        sorted_logits = -jnp.sort(-scaled, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the strictly more likely tokens
        # The smallest logit still inside the nucleus; ties with it are kept too.
        threshold = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        scaled = jnp.where(scaled < threshold, -jnp.inf, scaled)
    return jax.nn.log_softmax(scaled, axis=-1)


def sample_step(key: Array, logits: Array, *, temperature: float, top_k: int = 0, top_p: float = 1.0):
    """Draw one token per row; return ``(tokens [B], untempered log-probs [B], sampling log-probs [B])``.

    The untempered log-prob is ``log softmax(logits)[token]``: the model's own probability, which BPO uses as
    the behavior LLM's log-prob. The sampling log-prob is under the processed distribution.
    """
    logits = logits.astype(jnp.float32)
    model_logps = jax.nn.log_softmax(logits, axis=-1)
    untouched = temperature == 1.0 and not top_k and top_p >= 1.0  # plain ancestral sampling: one softmax
    processed = model_logps if untouched else sampling_log_probs(logits, temperature=temperature, top_k=top_k,
                                                                  top_p=top_p)
    if temperature == 0.0:
        tokens = jnp.argmax(logits, axis=-1)
    else:
        tokens = jax.random.categorical(key, processed, axis=-1)
    tokens = tokens.astype(jnp.int32)
    model_lp = jnp.take_along_axis(model_logps, tokens[:, None], axis=-1)[:, 0]
    sample_lp = jnp.take_along_axis(processed, tokens[:, None], axis=-1)[:, 0]
    return tokens, model_lp, sample_lp
