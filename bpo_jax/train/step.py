"""The jitted DAP train step: ``new_state, metrics = train_step(state, batch)``.

A batch holds B preference pairs laid out as the sampler produced them: a left-padded prompt of P tokens
followed by a right-padded response of N tokens, for the chosen and the rejected response:

  ``chosen_ids``, ``rejected_ids``        int32 [B, P + N]
  ``chosen_mask``, ``rejected_mask``      int32 [B, P + N]  (1 on real prompt and response tokens)
  ``prompt_len``                          static: P (the trainer scores only positions ≥ P)
  ``chosen_behavior_logps``, ``rejected_behavior_logps``  float32 [B]: the sampler's untempered log-probs
  ``truncated``                           float32 [B]: fraction of the pair's responses without an EOS
  ``weight`` (optional)                   float32 [B]: 1 for a pair the step trains on, 0 for a row that only
                                          holds a place (``identical_pairs=shrink``); absent: every pair 1

  ``phase_start`` (optional)              float32 [B]: 1 on every row of a phase's first batch (a row flag, so it is
                                          laid out like the rows on every mesh); absent: 0

The loss and every per-pair metric are means over the kept pairs of the whole batch, Σ w·ℓ / max(Σ w, 1), as
the official step's ``torch.sum(losses) / cur_acc_steps`` with ``cur_acc_steps`` the number of kept pairs
(``online_dpo_rand_trainer.py`` lines 954 and 1366, step_per_feedback = 1 by line 37); ``pairs_kept`` is Σ w.
A batch without a kept pair leaves every member's parameters and optimizer state as they were (the official step
then has no gradient, and torch's AdamW skips a parameter without one); the step counter still advances.

One forward runs chosen and rejected together; only the response positions are unembedded. When the reference
is the behavior LLM that sampled the pairs (BPO), the sampler's log-probs are the reference log-probs and no
reference forward runs; otherwise one forward under the reference weights runs outside the gradient.
Gradients are accumulated over ``micro_batches`` inside the step; each ensemble member gets its own gradients
and its own optimizer update (``lax.map`` over the ensemble axis, one member at a time to bound memory).

The behavior-gap checks come from the same forwards (``GAP_METRICS``): each member's summed response log-probs
against the sampler's, max and mean of |π − π_β sampler| over the batch's 2B responses, all rows, before the
update. At a phase start (π_β ← π_θ just happened) they must be within sampler rounding for the policy
(``LOGP_GAP_TOL_PER_TOKEN``). With one member the policy is that member; an ensemble's policy is the merged
ensemble, which no member forward computes, so on a ``phase_start`` batch one more forward (``lax.cond``: only
then) scores it, and ``member_logp_gap_max`` says how far the members are from π_β.

Under LoRA each member's forward applies its adapter in activation space (``state.adapter_params``: ``x W +
(x A)(s B)`` in float32 accumulation), and an ``ema``/``mixup`` reference runs as one adapter of rank N·r with
scale s/N (``state.ensemble_params``): no weight-sized merged copy is built in the step. Gradients, the
accumulator and the AdamW update are float32, like the master weights they update.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import optax

from bpo_jax.config import StepConfig, TrainConfig
from bpo_jax.logprobs import chunked_token_logprobs, reduce_masked
from bpo_jax.losses import BATCH_COUPLED, canonical_loss_type, dap_loss
from bpo_jax.models.config import ModelConfig
from bpo_jax.models.decoder import hidden_states, logits_from_hidden
from bpo_jax.train import state as st

BATCH_KEYS = ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask", "chosen_behavior_logps",
              "rejected_behavior_logps", "truncated")
WEIGHT_KEY = "weight"  # the batch's optional per-pair weight
PHASE_START_KEY = "phase_start"  # the batch's optional row flag: 1 on a phase's first batch
# The step's behavior-gap metrics (max and mean |π_θ − sampler| over the batch; the members' largest gap).
GAP_METRICS = ("policy_behavior_logp_gap", "policy_behavior_logp_gap_mean", "member_logp_gap_max")


def _separate_rows_hidden(model_config, params, mb, p: int):
    """Chosen and rejected as two rows ``[prompt | response]`` each: the hidden states that predict the response
    tokens, ``[2B, N, D]`` (position P − 1 + j predicts response token j)."""
    ids = jnp.concatenate([mb["chosen_ids"], mb["rejected_ids"]], axis=0)
    mask = jnp.concatenate([mb["chosen_mask"], mb["rejected_mask"]], axis=0)
    h, _ = hidden_states(model_config, params, ids, attention_mask=mask)
    return h[:, p - 1 : -1]


def _shared_prompt_hidden(model_config, params, mb, p: int):
    """The same ``[2B, N, D]`` from one row ``[prompt | chosen | rejected]`` per pair (P + 2N slots instead of two
    rows of P + N): the rejected response attends to the prompt but not to the chosen one, and its positions
    continue from the prompt's (``decoder.hidden_states``' ``branch``); the prompt's last hidden state predicts
    the first token of both. The prompt's layer work is done once. Assumes (as ``pairs.build_pairs`` makes them)
    that the chosen and rejected rows share the prompt half."""
    n = mb["chosen_ids"].shape[1] - p
    ids = jnp.concatenate([mb["chosen_ids"], mb["rejected_ids"][:, p:]], axis=1)
    mask = jnp.concatenate([mb["chosen_mask"], mb["rejected_mask"][:, p:]], axis=1)
    branch = jnp.broadcast_to(jnp.repeat(jnp.arange(3, dtype=jnp.int32), jnp.array([p, n, n]),
                                         total_repeat_length=p + 2 * n), ids.shape)
    prompt_mask = mask[:, :p]
    response_pos = jnp.sum(prompt_mask, axis=1, keepdims=True) + jnp.arange(n)[None]
    positions = jnp.concatenate([jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0), response_pos, response_pos],
                                axis=1)
    h, _ = hidden_states(model_config, params, ids, positions=positions, attention_mask=mask, branch=branch)
    rejected = jnp.concatenate([h[:, p - 1 : p], h[:, p + n : -1]], axis=1)
    return jnp.concatenate([h[:, p - 1 : p + n - 1], rejected], axis=0)


def pair_logps(model_config, params, mb, prompt_len: int, chunk: int = 0, share_prompt: bool = False):
    """(chosen logps, rejected logps, chosen lengths, rejected lengths) ``[B]`` each, from one forward over both:
    chosen and rejected as separate rows, or (``share_prompt``) as branches of one row; the same values.

    Only the hidden states that predict response tokens are unembedded: the prompt never costs vocabulary-sized
    logits. ``chunk`` > 0 unembeds that many positions at a time, rematerialised in the backward
    (``logprobs.chunked_token_logprobs``): no ``[2B, N, V]`` logits.
    """
    p, b = prompt_len, mb["chosen_ids"].shape[0]
    hidden = (_shared_prompt_hidden if share_prompt else _separate_rows_hidden)(model_config, params, mb, p)
    targets = jnp.concatenate([mb["chosen_ids"][:, p:], mb["rejected_ids"][:, p:]], axis=0)
    lp = chunked_token_logprobs(partial(logits_from_hidden, model_config), params, hidden, targets, chunk)
    out = reduce_masked(lp, jnp.concatenate([mb["chosen_mask"][:, p:], mb["rejected_mask"][:, p:]], axis=0))
    return out.sum[:b], out.sum[b:], out.count[:b], out.count[b:]


def _kl_policy_behavior(log_ratio):
    """Per-sample estimate of KL(π_θ‖π_β) from responses sampled by π_β: with r = π_θ/π_β,
    E_β[r·log r − (r − 1)] = KL(π_θ‖π_β) and every term is ≥ 0 (log r clipped to ±20)."""
    lr = jnp.clip(log_ratio, -20.0, 20.0)
    return jnp.exp(lr) * lr - jnp.expm1(lr)


def _pair_losses(cfg: StepConfig, pc, pr, rc, rr, nc, nr):
    """``(losses [B], metrics {name: [B]})``: the DAP loss and each of its metrics per pair, for the step to
    weight. ``dap_loss``'s metrics are batch means, so it runs on one pair at a time (``vmap``), where each mean
    is the pair's own value. A batch-coupled loss (``losses.BATCH_COUPLED``: a batch sort or mean) cannot be
    scored pair by pair: it runs on the batch, its metrics broadcast to every pair, and so needs every weight
    to be 1 (the config refuses ``identical_pairs=shrink`` with it)."""
    loss = partial(dap_loss, loss_type=cfg.loss_type, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                   discopop_tau=cfg.discopop_tau)
    if canonical_loss_type(cfg.loss_type) in BATCH_COUPLED:
        losses, m = loss(pc, pr, rc, rr, chosen_lengths=nc, rejected_lengths=nr)
        return losses, {k: jnp.broadcast_to(v, losses.shape) for k, v in m.items()}
    return jax.vmap(lambda *a: loss(*a[:4], chosen_lengths=a[4], rejected_lengths=a[5]))(pc, pr, rc, rr, nc, nr)


def _split_micro(batch, m: int):
    return jax.tree.map(lambda x: x.reshape(m, x.shape[0] // m, *x.shape[1:]), batch)


def train_step(cfg: StepConfig, model_config: ModelConfig, state: st.TrainState, batch: dict, *, prompt_len: int):
    """One optimizer step for every ensemble member on ``batch`` (un-jitted; see ``make_train_step``). ``cfg``
    holds only what the step computes with (``TrainConfig.step_config``)."""
    optimizer = st.make_optimizer(cfg)
    weight = batch.get(WEIGHT_KEY, jnp.ones_like(batch["truncated"])).astype(jnp.float32)
    kept = jnp.sum(weight)
    norm = jnp.maximum(kept, 1.0)  # the kept pairs of the whole batch: each micro-batch adds its share
    micro = _split_micro({**{k: batch[k] for k in BATCH_KEYS}, WEIGHT_KEY: weight}, cfg.micro_batches)

    if cfg.reference == "behavior":
        ref = (micro["chosen_behavior_logps"], micro["rejected_behavior_logps"])
    else:
        ref_params = jax.lax.stop_gradient(st.reference_params(cfg, state))
        ref = jax.lax.map(lambda mb: pair_logps(model_config, ref_params, mb, prompt_len, cfg.logprob_chunk,
                                                cfg.share_prompt)[:2], micro)

    def loss_fn(train_i, mb, ref_c, ref_r):
        params = st.adapter_params(cfg, state.base, train_i)
        pc, pr, nc, nr = pair_logps(model_config, params, mb, prompt_len, cfg.logprob_chunk, cfg.share_prompt)
        losses, m = _pair_losses(cfg, pc, pr, ref_c, ref_r, nc, nr)
        kl = 0.5 * (_kl_policy_behavior(pc - mb["chosen_behavior_logps"])
                    + _kl_policy_behavior(pr - mb["rejected_behavior_logps"]))
        m = {**m, "kl_policy_behavior": kl, "logps/chosen": pc, "logps/rejected": pr}
        w = mb[WEIGHT_KEY] / norm
        gap = _gap_max_sum(mb, jax.lax.stop_gradient(pc), jax.lax.stop_gradient(pr))
        return jnp.sum(w * losses), ({k: jnp.sum(w * v) for k, v in m.items()}, gap)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def one_member(args):
        train_i, opt_i = args

        def accumulate(acc, xs):
            mb, ref_c, ref_r = xs
            (loss, (m, gap)), g = grad_fn(train_i, mb, ref_c, ref_r)
            grads, sums, gaps = acc
            return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, {**m, "loss": loss}),
                    _combine_gaps(gaps, gap)), None

        zeros = jax.tree.map(jnp.zeros_like, train_i)
        _, (m_shape, _) = jax.eval_shape(loss_fn, train_i, jax.tree.map(lambda x: x[0], micro), ref[0][0],
                                         ref[1][0])
        init = (zeros, {**jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape), "loss": jnp.float32(0)},
                jnp.zeros(2, jnp.float32))
        (grads, metrics, gaps), _ = jax.lax.scan(accumulate, init, (micro, ref[0], ref[1]))  # sums of weighted means
        metrics["grad_norm"] = optax.tree.norm(grads)
        updates, new_opt = optimizer.update(grads, opt_i, train_i)
        unless_empty = lambda new, old: jnp.where(kept > 0, new, old)  # noqa: E731  no kept pair: no update
        return (jax.tree.map(unless_empty, optax.apply_updates(train_i, updates), train_i),
                jax.tree.map(unless_empty, new_opt, opt_i), metrics, gaps)

    trainable, opt_state, metrics, member_gaps = jax.lax.map(one_member, (state.trainable, state.opt_state))
    metrics = {**jax.tree.map(jnp.mean, metrics),
               **_gap_metrics(cfg, model_config, state, micro, batch, member_gaps, prompt_len)}
    metrics["learning_rate"] = cfg.optimizer.schedule(cfg.total_steps)(state.step)
    metrics["truncation_rate"] = jnp.sum(weight * batch["truncated"]) / norm
    metrics["pairs_kept"] = kept
    new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state,
                              reference=_updated_reference(cfg, state.reference, trainable, state.step + 1))
    return new_state, metrics


def _gap_max_sum(mb, pc, pr):
    """``[2]``: (max, sum) of |summed response log-probs − the sampler's| over a micro-batch's 2b responses."""
    gap = jnp.abs(jnp.concatenate([pc - mb["chosen_behavior_logps"], pr - mb["rejected_behavior_logps"]]))
    return jnp.stack([jnp.max(gap), jnp.sum(gap)])


def _combine_gaps(a, b):
    return jnp.stack([jnp.maximum(a[0], b[0]), a[1] + b[1]])


def _gap_metrics(cfg: StepConfig, model_config, state, micro, batch, member_gaps, prompt_len: int) -> dict:
    """``GAP_METRICS`` from the members' (max, sum) gaps ``[N, 2]``: one member is the policy; an ensemble's
    policy, the merged ensemble (``state.ensemble_params``, as π_β samples), is scored only on a phase-start batch
    (``PHASE_START_KEY``; 0 otherwise), one micro-batch at a time."""
    responses = 2 * batch["truncated"].shape[0]
    if member_gaps.shape[0] == 1:
        policy = member_gaps[0]
    else:
        def merged(_):
            params = st.ensemble_params(cfg, state.base, state.trainable)
            per_micro = jax.lax.map(
                lambda mb: _gap_max_sum(mb, *pair_logps(model_config, params, mb, prompt_len, cfg.logprob_chunk,
                                                        cfg.share_prompt)[:2]), micro)
            return jnp.stack([jnp.max(per_micro[:, 0]), jnp.sum(per_micro[:, 1])])

        start = jnp.max(batch.get(PHASE_START_KEY, jnp.zeros(1))) > 0
        policy = jax.lax.cond(start, merged, lambda _: jnp.zeros(2, jnp.float32), None)
    return {GAP_METRICS[0]: policy[0], GAP_METRICS[1]: policy[1] / responses,
            GAP_METRICS[2]: jnp.max(member_gaps[:, 0])}


def _updated_reference(cfg: StepConfig, reference, trainable, step):
    """``ema``: ref ← (1 − rate)·ref + rate·θ every step. ``mixup`` (TR-DPO soft update): ref ← α·θ + (1 − α)·ref
    every ``mixup_every`` steps. Under LoRA both act on the adapter factors (as PEFT-based TR-DPO code does),
    so the reference's weight delta is not exactly the average of the policies' deltas."""
    if cfg.reference == "ema":
        return jax.tree.map(lambda r, t: (1 - cfg.ema_rate) * r + cfg.ema_rate * t, reference, trainable)
    if cfg.reference == "mixup":
        due = (step % cfg.mixup_every) == 0
        return jax.tree.map(lambda r, t: jnp.where(due, cfg.mixup_alpha * t + (1 - cfg.mixup_alpha) * r, r),
                            reference, trainable)
    return reference


def step_model_config(cfg: TrainConfig | StepConfig, model_config: ModelConfig) -> ModelConfig:
    """The model config the step computes with. ``remat`` and ``attention`` have one home, the run's config:
    they replace the model config's (a model loaded without ``remat=`` still rematerialises as the run says).
    The compute dtype is fixed when the model is loaded (with the weights' own dtype, ``param_dtype``), so a model
    config whose compute dtype disagrees with the run's explicit ``dtype`` is refused (load the model with the
    run's dtypes, as ``bpo_jax.wiring.tasks.setup_run`` does; ``dtype=auto`` takes the model's)."""
    if cfg.dtype != "auto" and model_config.dtype != cfg.dtype:
        raise ValueError(f"the run's dtype={cfg.dtype} but the model was loaded with dtype={model_config.dtype}; "
                         f"load it with load_pretrained(..., dtype={cfg.dtype!r})")
    return dataclasses.replace(model_config, remat=cfg.remat, attention=cfg.attention)


def make_train_step(cfg: TrainConfig | StepConfig, model_config: ModelConfig, state_shardings, *, prompt_len: int,
                    batch_sharding=None):
    """``train_step`` jitted (``jit_state_step``)."""
    return jit_state_step(train_step, cfg, model_config, state_shardings, prompt_len=prompt_len,
                          batch_sharding=batch_sharding)


def jit_state_step(step_fn, cfg: TrainConfig | StepConfig, model_config: ModelConfig, state_shardings, *,
                   prompt_len: int, batch_sharding=None):
    """``step_fn(cfg, model_config, state, batch, prompt_len=)`` (the DAP step, the SFT step) jitted with explicit
    in/out shardings, the state donated — all but the frozen base weights, which the step only reads (and the
    caller may still hold). The step sees ``cfg.step_config`` only; the model config's numerics are the run's
    (``step_model_config``)."""
    cfg = cfg.step_config
    model_config = step_model_config(cfg, model_config)

    def fn(rest, base, batch):
        new_state, metrics = step_fn(cfg, model_config, rest.replace(base=base), batch, prompt_len=prompt_len)
        return new_state.replace(base=None), metrics

    rest_shardings = state_shardings.replace(base=None)
    jitted = jax.jit(fn, in_shardings=(rest_shardings, state_shardings.base, batch_sharding),
                     out_shardings=(rest_shardings, None), donate_argnums=(0,))

    def step(state, batch):
        rest, metrics = jitted(state.replace(base=None), state.base, batch)
        return rest.replace(base=state.base), metrics

    return step


# The sampler-vs-forward tolerance, per response token: the sampler's cached decode sums attention in another
# order than a full forward, so the same model gives summed response log-probs that differ by rounding only,
# up to ``LOGP_GAP_TOL_PER_TOKEN[compute dtype] × response tokens`` (measured on tiny models: ≈4e-7 per token in
# float32, ≈7e-4 in bfloat16). A gap above it means the two ran different models.
LOGP_GAP_TOL_PER_TOKEN = {"float32": 2e-5, "bfloat16": 2e-2}


@partial(jax.jit, static_argnames=("model_config", "prompt_len", "share_prompt"))
def behavior_logp_gap(model_config, params, batch, *, prompt_len: int, share_prompt: bool = False):
    """Largest |trainer forward − sampler| gap in summed response log-probs over a batch. At the start of a
    phase the behavior LLM must score its own samples exactly as the sampler did; a gap here (different dtype,
    params or masking) silently breaks BPO's reference."""
    pc, pr, _, _ = pair_logps(model_config, params, batch, prompt_len, share_prompt=share_prompt)
    return _gap_max_sum(batch, pc, pr)[0]
