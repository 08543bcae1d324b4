"""The online BPO loop — T steps in F annotation phases, K = T / F steps per phase. In each phase:

  1. the behavior LLM π_β samples two responses per prompt for the phase's K batches of prompts;
  2. pairs whose two responses are the same text are dropped;
  3. the annotator scores both responses; the higher one is y_w;
  4. the policy π_θ trains K steps on these pairs with L_DAP(π_θ; reference);
  5. π_β ← π_θ.

With ``reference=behavior`` this is BPO; F = 1 is offline DAP and F = T is on-policy. Checkpoints (every
``checkpoint_every`` steps and at each phase end) hold the state, the phase's pairs and the prompt stream's state,
so the same command on the same ``run_dir`` resumes exactly; SIGTERM saves and exits.

Several processes (``bpo_jax.distributed``): each host owns B/P prompts of every global batch of B. It samples
them with π_β on the global mesh, decodes and annotates only its own rows, and keeps its own pairs; the
collection goes on until every host has its K·B/P pairs (the hosts agree on that from their gathered counts).
Each train step's global batch is assembled from the hosts' rows, so the same global batch gives the same
losses whatever the number of processes. The primary host alone prints and writes metrics.
"""

from __future__ import annotations

import math
import os
import signal

import jax
import numpy as np
from tqdm.auto import tqdm

from bpo_jax import distributed, run_dir
from bpo_jax import state as st
from bpo_jax.checkpoint import Checkpointer
from bpo_jax.config import TrainConfig
from bpo_jax.models.decoder import unstack_layers
from bpo_jax.pairs import build_pairs, distinct
from bpo_jax.sampling import generate
from bpo_jax.train_step import BATCH_KEYS, behavior_logp_gap, make_train_step, member_logp_gaps


class Preempted(Exception):
    """Raised after SIGTERM once a checkpoint is saved."""


def collect_pairs(cfg: TrainConfig, model_config, behavior, tokenizer, prompts, annotator, key, *, mesh=None,
                  eos_token_ids=()):
    """Steps 1–3 for one phase: sample with π_β from the next batches of the prompt stream (advancing it) until
    K·B distinct, annotated pairs exist (K·B/P on each of P hosts). Each sampling call takes as many of the
    stream's batches as the phase still needs, up to ``sampling_batch_size`` prompts (sampling throughput grows
    with the batch); its responses are decoded and annotated together. Returns this host's ``(pairs, stats)``."""
    b_local = prompts.local_batch_size
    need = cfg.steps_per_phase * b_local
    most = max(1, (cfg.sampling_batch_size or cfg.batch_size) // cfg.batch_size)  # stream batches per call
    behavior = unstack_layers(behavior)  # once per phase, not once per generate call
    chunks, have, sampled, dropped, rounds = [], 0, 0, 0, 0
    bar = tqdm(total=need, desc="collecting pairs", unit="pair", leave=False, disable=not distributed.is_primary())
    while (fewest := distributed.min_over_hosts(have)) < need:  # every host takes the same decision
        if rounds > 20 * cfg.steps_per_phase and fewest == 0:
            raise RuntimeError("the behavior LLM keeps sampling identical pairs; raise temperature")
        batches = [prompts.next_batch() for _ in range(min(most, -(-(need - fewest) // b_local)))]
        texts_in = [p for bt in batches for p in bt.prompts]
        ids, pmask = np.concatenate([bt.ids for bt in batches]), np.concatenate([bt.mask for bt in batches])
        out = generate(behavior, ids, pmask, config=model_config,
                       max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                       top_p=cfg.top_p, num_samples=2, eos_token_ids=eos_token_ids,
                       rng=jax.random.fold_in(key, rounds), mesh=mesh, pad_token_id=model_config.pad_token_id or 0)
        rounds += 1
        toks, mask = out.tokens, out.mask  # this host's rows
        texts = [tokenizer.decode(t[m.astype(bool)], skip_special_tokens=True).strip() for t, m in zip(toks, mask)]
        keep = distinct(texts)
        scores = annotator([p for p in texts_in for _ in range(2)], texts)
        chunks.append(build_pairs(ids, pmask, toks, mask, out.logprobs, scores, keep, eos_token_ids=eos_token_ids))
        have += int(keep.sum())
        sampled += len(texts_in)
        dropped += int((~keep).sum())
        bar.update(min(int(keep.sum()), need - bar.n))
    bar.close()
    pairs = {k: np.concatenate([c[k] for c in chunks])[:need] for k in chunks[0]}
    counts = distributed.all_gather(np.asarray([sampled, dropped, pairs["truncated"].sum()], np.float64)).sum(0)
    stats = {"prompts_sampled": int(counts[0]), "identical_pairs_dropped": int(counts[1]),
             "truncation_rate": float(counts[2] / (need * distributed.process_count()))}
    return pairs, stats


def train(cfg: TrainConfig, *, model_config, tokenizer, base, prompts, annotator, mesh=None, eos_token_ids=(),
          evaluate=None, reference=None, lora_init=None, log=print) -> st.TrainState:
    """Run (or resume) the online loop; ``evaluate(params, step) -> dict`` is called every ``eval_every`` steps.
    ``prompts``: a prompt stream (``bpo_jax.data.prompts``) of ``cfg.batch_size`` prompts per global batch; its
    state is checkpointed (one per host). ``reference``: the fixed reference's weights (``reference=fixed``).
    ``lora_init``: the ensemble's starting factors (``lora_init_from``; unused when resuming). Returns the final
    state."""
    if prompts.batch_size != cfg.batch_size:
        raise ValueError(f"the prompt stream yields {prompts.batch_size} prompts per batch; the config's "
                         f"batch_size is {cfg.batch_size}")
    run_dir.make(cfg.run_dir)
    ckpt = Checkpointer(cfg.run_dir, cfg.keep_checkpoints)
    state = st.create_state(cfg, base, jax.random.key(cfg.seed), reference=reference, lora_init=lora_init)
    pairs = None
    if (restored := ckpt.restore_latest(state, mesh=mesh, warn=log)) is not None:
        latest, state, pairs, meta = restored
        prompts.set_state(meta["prompts"][distributed.process_index()])
        log(f"resumed {cfg.run_dir} at step {latest}")
    K, B, P = cfg.steps_per_phase, prompts.local_batch_size, prompts.width  # B: this host's pairs per step
    step_fn = make_train_step(cfg, model_config, st.shardings(state), prompt_len=P)
    metrics_path = run_dir.path(cfg.run_dir, "metrics.jsonl")
    stop = _SigtermFlag()
    writer = _tensorboard(cfg.run_dir)
    bar = tqdm(total=cfg.total_steps, initial=int(state.step), desc="training", unit="step",
               disable=not distributed.is_primary())
    phase_stats: dict = {}
    try:
        while (step := int(state.step)) < cfg.total_steps:
            phase = step // K
            if pairs is None:  # a new phase: π_β ← π_θ (after the first), then collect its pairs with π_β
                if phase > int(state.phase):
                    state = st.sync_behavior(state)
                behavior = st.behavior_params(cfg, state)
                pairs, phase_stats = collect_pairs(
                    cfg, model_config, behavior, tokenizer, prompts, annotator,
                    jax.random.fold_in(jax.random.key(cfg.seed), phase), mesh=mesh, eos_token_ids=eos_token_ids)
                first = distributed.global_rows({k: v[:B] for k, v in pairs.items() if k in BATCH_KEYS}, mesh)
                phase_stats["behavior_logp_gap"] = float(behavior_logp_gap(
                    model_config, behavior, first, prompt_len=P, share_prompt=cfg.share_prompt))
                if cfg.ensemble_size > 1:
                    gaps = member_logp_gaps(cfg, model_config, state.base, state.trainable, first, prompt_len=P)
                    phase_stats["member_logp_gap_max"] = float(gaps.max())
                del behavior
            i = step - phase * K
            batch = distributed.global_rows({k: pairs[k][i * B:(i + 1) * B] for k in BATCH_KEYS}, mesh)
            state, metrics = step_fn(state, batch)
            record = {"step": step + 1, "phase": phase + 1, **{k: float(v) for k, v in metrics.items()}}
            if i == 0:
                record.update({f"phase/{k}": v for k, v in phase_stats.items()})
            if not math.isfinite(record["loss"]):  # the loss is one global value: every host stops here
                raise FloatingPointError(f"loss is {record['loss']} at step {step + 1}; stopping. The last good "
                                         f"checkpoint in {ckpt.directory} is untouched.")
            if i == K - 1:
                pairs = None  # phase done
            if evaluate is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                record.update(evaluate(st.policy_params(cfg, state), step + 1))
            _write(metrics_path, writer, record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", phase=phase + 1)
            due = pairs is None or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0)
            preempted = distributed.any_host(stop.raised)  # one host's SIGTERM: every host saves, then stops
            if due or preempted:
                ckpt.save(step + 1, state, None if pairs is None else distributed.global_rows(pairs, mesh),
                          {"prompts": distributed.gather_json(prompts.get_state())})
            if preempted:
                raise Preempted(f"SIGTERM: saved a checkpoint at step {step + 1} in {ckpt.directory}")
    finally:
        bar.close()
        stop.restore()
        ckpt.close()
    return state


def _write(path, writer, record):
    run_dir.append_jsonl(path, record)
    if writer is not None:
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                writer.add_scalar(k, v, record["step"])
        writer.flush()


def _tensorboard(directory):
    """A tensorboardX writer on the primary host of a local run when the package is installed, else None."""
    if not distributed.is_primary() or distributed.is_remote(directory):
        return None
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(os.path.join(directory, "tensorboard"))


class _SigtermFlag:
    """Turns SIGTERM (e.g. a TPU preemption) into a flag the loop checks after each step."""

    def __init__(self):
        self.raised = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.raised = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)
