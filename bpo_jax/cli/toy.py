"""A seconds-long BPO experiment on a toy "LLM": a softmax policy over a fixed set of responses.

The policy is a logit vector θ over ``num_responses`` candidate responses to one prompt; a hidden gold reward
scores each response. The loop is the paper's algorithm in miniature — T steps in F annotation phases; in each
phase the behavior policy π_β samples two responses per prompt, identical pairs are dropped, the annotator (a
Bradley–Terry draw on the gold reward) picks the winner, the policy trains K = T/F steps with a DAP loss whose
reference is π_β (``behavior``, BPO) or the initial model (``sft``), then π_β ← π_θ.

It exercises ``bpo_jax.losses.dap_loss`` end to end and shows the paper's comparison — offline (F=1),
BPO (reference = behavior, F=2 and F=T) and on-policy with the SFT reference — as expected gold reward. The
real trainer on a language model lives in the trainer modules; this one exists for intuition and as a check.
"""

from __future__ import annotations

import argparse
import logging
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bpo_jax.losses import LOSS_TYPES, dap_loss

log = logging.getLogger(__name__)


def _logps(theta, idx):
    return jax.nn.log_softmax(theta)[idx]


@partial(jax.jit, static_argnames=("loss_type", "beta", "opt"))
def _train_step(theta, opt_state, ref_theta, chosen, rejected, weight, *, loss_type, beta, opt):
    def loss_fn(t):
        losses, _ = dap_loss(
            _logps(t, chosen), _logps(t, rejected), _logps(ref_theta, chosen), _logps(ref_theta, rejected),
            loss_type=loss_type, beta=beta,
        )
        return jnp.sum(losses * weight) / jnp.maximum(jnp.sum(weight), 1.0)

    loss, grads = jax.value_and_grad(loss_fn)(theta)
    updates, opt_state = opt.update(grads, opt_state, theta)
    return optax.apply_updates(theta, updates), opt_state, loss


def run(*, num_phases, reference, total_steps=64, batch_size=16, num_responses=64, loss_type="sigmoid",
        beta=0.1, learning_rate=0.05, seed=0):
    """Run one toy BPO training; return the expected gold reward of π_θ after every step (length T+1)."""
    if total_steps % num_phases:
        raise ValueError(f"total_steps={total_steps} must be a multiple of num_phases={num_phases}")
    if reference not in ("behavior", "sft"):
        raise ValueError(f"reference must be 'behavior' or 'sft', got {reference!r}")
    rng = np.random.default_rng(seed)
    gold = rng.normal(size=num_responses)
    # The "SFT model": mostly mass on mediocre responses, little on the best ones.
    sft = jnp.asarray(-0.8 * gold + rng.normal(size=num_responses), jnp.float32)
    opt = optax.adam(learning_rate)
    theta, opt_state = sft, opt.init(sft)
    key = jax.random.key(seed)
    curve = [float(jax.nn.softmax(theta) @ gold)]
    steps_per_phase = total_steps // num_phases
    for _ in range(num_phases):
        behavior = theta  # π_β ← π_θ (at the first phase, π_β is the SFT model)
        key, k = jax.random.split(key)
        pairs = np.asarray(jax.random.categorical(k, behavior, shape=(steps_per_phase, batch_size, 2)))
        key, k = jax.random.split(key)
        p_first = 1.0 / (1.0 + np.exp(-(gold[pairs[..., 0]] - gold[pairs[..., 1]]) * 4.0))
        first_wins = np.asarray(jax.random.uniform(k, p_first.shape)) < p_first
        chosen = np.where(first_wins, pairs[..., 0], pairs[..., 1])
        rejected = np.where(first_wins, pairs[..., 1], pairs[..., 0])
        keep = (pairs[..., 0] != pairs[..., 1]).astype(np.float32)  # identical pairs are dropped
        ref = behavior if reference == "behavior" else sft
        for s in range(steps_per_phase):
            theta, opt_state, _ = _train_step(
                theta, opt_state, ref, chosen[s], rejected[s], keep[s], loss_type=loss_type, beta=beta, opt=opt
            )
            curve.append(float(jax.nn.softmax(theta) @ gold))
    return np.asarray(curve)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bpo_jax toy", description=__doc__.split("\n\n")[0])
    p.add_argument("--loss-type", default="sigmoid", choices=list(LOSS_TYPES) + ["dpo", "slic"])
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--total-steps", type=int, default=64)
    p.add_argument("--seeds", type=int, default=4)
    args = p.parse_args(argv)
    from bpo_jax.runtime import logs

    logs.setup()
    t = args.total_steps
    settings = [("offline DAP (F=1, ref=SFT)", 1, "sft"), ("on-policy (F=T, ref=SFT)", t, "sft"),
                ("BPO (F=2, ref=behavior)", 2, "behavior"), ("BPO (F=T, ref=behavior)", t, "behavior")]
    log.info(f"toy BPO: {args.loss_type}, beta={args.beta}, T={t}; expected gold reward of pi_theta "
             f"(mean over {args.seeds} seeds)")
    for label, f, ref in settings:
        curves = np.stack([run(num_phases=f, reference=ref, total_steps=t, loss_type=args.loss_type,
                               beta=args.beta, seed=s) for s in range(args.seeds)])
        log.info(f"  {label:28s} start {curves[:, 0].mean():+.3f}  end {curves[:, -1].mean():+.3f}")
    return 0
