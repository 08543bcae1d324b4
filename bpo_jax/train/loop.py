"""The online BPO loop — T steps in F annotation phases, K = T / F steps per phase. In each phase:

  1. the behavior LLM π_β samples two responses per prompt for the phase's K batches of prompts;
  2. pairs whose two responses are the same text are dropped (``identical_pairs``: ``resample`` samples more
     prompts until the phase has K·B pairs; ``shrink`` keeps the phase's K·B prompts and weights the dropped
     pairs 0, so a step trains on fewer pairs, as the official code does; ``bpo_jax.train.pairs``);
  3. the annotator scores both responses; the higher one is y_w;
  4. the policy π_θ trains K steps on these pairs with L_DAP(π_θ; reference);
  5. π_β ← π_θ.

With ``reference=behavior`` this is BPO; F = 1 is offline DAP and F = T is on-policy. Checkpoints (every
``checkpoint_every`` steps and at each phase end) hold the state, the phase's pairs and the prompt stream's state,
so the same command on the same ``run_dir`` resumes exactly; SIGTERM saves and exits.

Each step's record in ``metrics.jsonl`` carries ``phase_start`` (1 on a phase's first step). There, under
``reference=behavior``, π_θ = π_β, so h = 0 up to rounding and ``rewards/accuracies`` (the fraction of pairs
with h > 0) is rounding noise, not a measure of the policy: read it over the steps with ``phase_start`` 0 (with
F = T there are none).

Several processes (``bpo_jax.runtime.distributed``): each host owns B/P prompts of every global batch of B. It samples
them with π_β on the global mesh and decodes and annotates only its own rows; the collection goes on until the
hosts together have K·B pairs (from their gathered counts), and the phase trains on the first K·B kept pairs in
the stream's order, each host holding the rows of its batch slots (``bpo_jax.train.pair_order``).
Each train step's global batch is assembled from the hosts' rows, so the same global batch gives the same
losses whatever the number of processes. The primary host alone prints and writes metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal

import jax
import numpy as np
from tqdm.auto import tqdm

from bpo_jax.config import TrainConfig
from bpo_jax.models.decoder import unstack_layers
from bpo_jax.runtime import distributed, run_dir
from bpo_jax.runtime.trackers import open_trackers
from bpo_jax.sample.sampler import Decoding, distinct, for_sampling, generate
from bpo_jax.train import pair_order
from bpo_jax.train import state as st
from bpo_jax.train.checkpoint import Checkpointer
from bpo_jax.train.pairs import build_pairs, tied
from bpo_jax.train.step import (
    BATCH_KEYS,
    GAP_METRICS,
    LOGP_GAP_TOL_PER_TOKEN,
    PHASE_START_KEY,
    WEIGHT_KEY,
    behavior_logp_gap,
    make_train_step,
)

log = logging.getLogger(__name__)


class Preempted(Exception):
    """Raised after SIGTERM once the last completed state is on disk (saved now, or by the last checkpoint)."""


class Preemption:
    """SIGTERM (a TPU or Spot preemption notice, SLURM's ``--signal``) as a flag that every host checks at the
    same points: before each collection round, before each evaluation batch and after each train step.

    ``check()`` is a collective (``distributed.any_host``): one host's signal stops every host at the same
    point, where ``Preempted`` is raised. A ``with`` block installs the handler and restores the previous one.
    """

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self) -> "Preemption":
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame):
        if not self.raised:  # a scheduler may send it more than once (Slurm's time limit does)
            log.warning("SIGTERM received: the run stops at its next check (after this sampling call, evaluation "
                        "batch or train step) and exits 143 with its last completed state on disk")
        self.raised = True

    def requested(self) -> bool:
        """True on every host when any host has seen SIGTERM (a collective)."""
        return distributed.any_host(self.raised)

    def check(self, during: str = "evaluation") -> None:
        if self.requested():
            raise Preempted(f"SIGTERM during {during}")


def collect_pairs(cfg: TrainConfig, run, behavior, key, *, interrupt=None):
    """Steps 1–3 for one phase: sample with π_β (``behavior``: its params) from the next batches of the run's
    prompt stream ``run.task.train`` (advancing it), annotated by ``run.task.annotator``, until K·B distinct,
    annotated pairs exist over all hosts, or (``identical_pairs=shrink``) from the phase's K·B prompts, the
    dropped pairs weighted 0. The phase trains on the first K·B kept pairs in stream order, whatever the number
    of hosts (``bpo_jax.train.pair_order``: each host ends with the K·B/P rows of its batch slots). Each
    sampling call takes as many of the stream's batches as the phase still needs, up to
    ``sampling_batch_size`` prompts (sampling throughput grows with the batch); its responses are decoded and
    annotated together. π_β samples in the layout ``sampling_layout`` picks (``sampler.for_sampling``: its
    weights moved once per phase). ``response_eos=append``: the sampler ends every response with an EOS
    (``Decoding.append_eos``). ``interrupt(during)`` runs before each round (a preemption check). Returns this
    host's ``(pairs, stats)``."""
    prompts, annotator, model_config, eos_token_ids = run.task.train, run.task.annotator, run.model.config, \
        run.eos_token_ids
    B, need = prompts.batch_size, cfg.steps_per_phase * prompts.batch_size  # global counts
    shrink, append = cfg.identical_pairs == "shrink", cfg.response_eos == "append"
    most = max(1, (cfg.sampling_batch_size or cfg.batch_size) // cfg.batch_size)  # stream batches per call
    behavior = unstack_layers(for_sampling(model_config, behavior, run.mesh, cfg.sampling_layout))  # once per phase
    decoding = Decoding(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                        top_p=cfg.top_p, num_samples=2, eos_token_ids=eos_token_ids,
                        pad_token_id=model_config.pad_token_id or 0, append_eos=append)  # two per prompt
    chunks, taken, have, sampled, rounds = [], [], 0, 0, 0
    tally = np.zeros(2, np.int64)  # identical pairs, tied pairs
    bar = tqdm(total=need, desc="collecting pairs", unit="pair", leave=False, disable=not distributed.is_primary())
    while (total := int(distributed.all_gather(np.int64(have)).sum())) < need:  # every host: the same decision
        bar.update(total - bar.n)
        if rounds > 20 * cfg.steps_per_phase and total == 0:
            # Settings to change, not a transient failure (ValueError: exit 2, the launchers do not restart it).
            if distributed.any_host(bool(tally[1])):  # every host raises the same error
                raise ValueError(f"the annotator scored the two responses of every distinct pair equal in {rounds} "
                                 f"rounds, and tied_pairs=drop keeps no tied pair; use an annotator that "
                                 f"separates them, or tied_pairs=second (the official code's label)")
            raise ValueError(f"the behavior LLM sampled two identical responses for every prompt in {rounds} rounds; "
                             f"raise temperature, top_k or top_p")
        if interrupt is not None:
            interrupt("the collection of pairs")
        calls = min(most, -(-(need - total) // B))
        batches = distributed.agreed(lambda: [prompts.next_batch() for _ in range(calls)])  # a host-local read
        texts_in = [p for bt in batches for p in bt.prompts]
        ids, pmask = np.concatenate([bt.ids for bt in batches]), np.concatenate([bt.mask for bt in batches])
        out = generate(behavior, ids, pmask, decoding, config=model_config, rng=jax.random.fold_in(key, rounds),
                       mesh=run.mesh)
        rounds += 1
        toks, mask = out.tokens, out.mask  # this host's rows
        texts = out.texts(run.tokenizer)
        differ = distinct(texts)
        scores = annotator([p for p in texts_in for _ in range(2)], texts)
        keep, ties = differ, differ & tied(scores)  # distinct responses the annotator cannot tell apart
        if cfg.tied_pairs == "drop":
            keep = keep & ~ties
        chunks.append(build_pairs(ids, pmask, toks, mask, out.logprobs, scores, keep, eos_token_ids=eos_token_ids,
                                  shrink=True, eos_appended=append))  # every row, weighted: the plan picks
        taken.append(np.ones_like(keep) if shrink else keep)
        have += int(taken[-1].sum())
        sampled += len(texts_in)
        tally += [int((~differ).sum()), int(ties.sum())]
    bar.update(min(total, need) - bar.n)
    bar.close()
    plans = pair_order.phase_plan(distributed.all_gather(np.concatenate(taken)),
                                  pair_order.host_rows(run.mesh, B), B, cfg.steps_per_phase)
    pairs = pair_order.exchange({k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}, plans,
                                distributed.process_index())
    kept, truncated = pairs[WEIGHT_KEY].sum(), (pairs[WEIGHT_KEY] * pairs["truncated"]).sum()
    counts = distributed.all_gather(np.asarray([sampled, *tally, truncated, kept], np.float64)).sum(0)
    stats = {"prompts_sampled": int(counts[0]), "identical_pairs_dropped": int(counts[1]),
             "tied_pairs": int(counts[2]), "tied_pairs_dropped": int(counts[2]) if cfg.tied_pairs == "drop" else 0,
             "truncation_rate": float(counts[3] / max(counts[4], 1.0)), "pairs_kept": int(counts[4])}
    return pairs, stats


def train(cfg: TrainConfig, run, *, evaluate=None, lora_init=None, stop: Preemption | None = None,
          trackers=None, metrics: run_dir.JsonlLog | None = None) -> st.TrainState:
    """Run (or resume) the online loop on ``run`` (``bpo_jax.wiring.tasks.Run``: its model's params are the SFT
    start, ``run.task.train`` the prompt stream of ``cfg.batch_size`` prompts per global batch, whose state is
    checkpointed, one per host; ``run.task.annotator`` ranks the pairs; ``run.reference`` the fixed reference's
    weights for ``reference=fixed``; ``tasks.training_run`` builds one from parts). ``evaluate(params, step) ->
    dict`` is called every ``eval_every`` steps. ``lora_init``: the ensemble's starting factors
    (``lora_init_from``; unused when resuming). ``stop``: the caller's ``Preemption`` (which ``evaluate`` should
    check too); default: one of the loop's own. ``trackers``: the caller's open
    ``bpo_jax.runtime.trackers.Trackers`` (left open); default: the config's own, closed at the end.
    ``metrics``: the caller's ``run_dir.JsonlLog`` of ``<run_dir>/metrics.jsonl`` (the one writer of that file in
    this process: a caller that writes records there too passes its own); default: one of the loop's own. Every
    checkpoint flushes it before it saves. Returns the final state.

    On SIGTERM the loop raises ``Preempted`` with the last completed state on disk: after a train step it saves
    that step; during a collection nothing is saved (the last checkpoint, or the fresh start, is where the phase
    began, so a resume redoes the same collection); during a periodic evaluation it saves the step and marks
    the evaluation pending, and the resumed run makes it first."""
    prompts = run.task.train
    if prompts.batch_size != cfg.batch_size:
        raise ValueError(f"the prompt stream yields {prompts.batch_size} prompts per batch; the config's "
                         f"batch_size is {cfg.batch_size}")
    run_dir.make(cfg.run_dir)
    state = st.committed(st.create_state(cfg, run.model.params, jax.random.key(cfg.seed), reference=run.reference,
                                         lora_init=lora_init, compute_dtype=run.model.config.dtype))
    if metrics is None:
        metrics = run_dir.JsonlLog(run_dir.path(cfg.run_dir, "metrics.jsonl"))
    out = _Outputs(evaluate, Checkpointer(cfg.run_dir, cfg.keep_checkpoints, logs=(metrics,)),
                   stop if stop is not None else Preemption().__enter__(), metrics,
                   trackers if trackers is not None else open_trackers(cfg))
    pairs = None
    try:
        if (restored := out.ckpt.restore_latest(state, mesh=run.mesh)) is not None:
            latest, state, pairs, meta = restored
            state = st.merge_legacy_behavior(cfg, state, run.model.config.dtype)
            if pairs is not None and WEIGHT_KEY not in pairs:  # saved before pairs carried weights: all kept
                pairs[WEIGHT_KEY] = np.ones(len(pairs["truncated"]), np.float32)
            prompts.set_state(meta["prompts"][distributed.process_index()])
            log.info(f"resumed {cfg.run_dir} at step {latest}")
            if meta.get("pending_eval") and evaluate is not None:  # interrupted by a preemption: make it now
                policy = st.policy_params(cfg, state, run.model.config.dtype)
                out.write({"step": latest, **evaluate(policy, latest)})
        return _loop(cfg, run, out, state, pairs)
    finally:
        if stop is None:
            out.stop.__exit__()
        if trackers is None:
            out.trackers.close()
        out.ckpt.close()


@dataclasses.dataclass
class _Outputs:
    """Where the loop's results go, and what may stop it: the evaluation, checkpoints, metrics, SIGTERM."""
    evaluate: object  # (params, step) -> metrics, or None
    ckpt: Checkpointer
    stop: Preemption
    metrics: run_dir.JsonlLog  # metrics.jsonl
    trackers: object

    def write(self, record: dict) -> None:
        """One metrics record: a line of ``metrics.jsonl`` and a point in each tracker (primary host only)."""
        self.metrics.append(record)
        self.trackers.log(record)


def _loop(cfg: TrainConfig, run, out: _Outputs, state, pairs) -> st.TrainState:
    """The steps from ``state`` (with the phase's remaining ``pairs``, or None at a phase start) to T, as
    ``train``'s docstring says; returns the final state."""
    prompts, mesh = run.task.train, run.mesh
    K, B, P = cfg.steps_per_phase, prompts.local_batch_size, prompts.width  # B: this host's pairs per step
    step_fn = make_train_step(cfg, run.model.config, st.shardings(state), prompt_len=P)
    bar = tqdm(total=cfg.total_steps, initial=int(state.step), desc="training", unit="step",
               disable=not distributed.is_primary())
    phase_stats: dict = {}
    try:
        while (step := int(state.step)) < cfg.total_steps:
            phase = step // K
            if pairs is None:  # a new phase: π_β ← π_θ (after the first), then collect its pairs with π_β
                state, pairs, phase_stats = _start_phase(cfg, run, state, phase, out.stop)
            i = step - phase * K
            rows = {k: pairs[k][i * B:(i + 1) * B] for k in (*BATCH_KEYS, WEIGHT_KEY)}
            rows[PHASE_START_KEY] = np.full(B, float(i == 0), np.float32)  # the step then checks π_θ against π_β
            state, metrics = step_fn(state, distributed.global_rows(rows, mesh))
            record = {"step": step + 1, "phase": phase + 1, "phase_start": int(i == 0),
                      **{k: float(v) for k, v in metrics.items() if k not in GAP_METRICS}}
            if i == 0:  # the gaps mean π_θ vs π_β only where π_β ← π_θ just happened
                gaps = {k: float(metrics[k]) for k in GAP_METRICS[:2 if cfg.ensemble_size == 1 else 3]}
                record.update({f"phase/{k}": v for k, v in {**phase_stats, **gaps}.items()})
                _warn_gaps(cfg, run.model.config.dtype, phase, record)
            if not math.isfinite(record["loss"]):  # the loss is one global value: every host stops here
                raise FloatingPointError(f"loss is {record['loss']} at step {step + 1}; stopping. The last good "
                                         f"checkpoint in {out.ckpt.directory} is untouched.")
            pairs = None if i == K - 1 else pairs  # phase done
            save = lambda **extra: out.ckpt.save(  # noqa: E731
                step + 1, state, None if pairs is None else distributed.global_rows(pairs, mesh),
                {"prompts": distributed.gather_json(prompts.get_state()), **extra})
            if out.evaluate is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                _periodic_eval(cfg, run, out, state, step + 1, record, save)
            out.write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", phase=phase + 1)
            preempted = out.stop.requested()  # one host's SIGTERM: every host saves, then stops
            if preempted or pairs is None or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0):
                save()
            if preempted:
                raise Preempted(f"SIGTERM: saved a checkpoint at step {step + 1} in {out.ckpt.directory}")
    finally:
        bar.close()
    return state


def _periodic_eval(cfg: TrainConfig, run, out: _Outputs, state, step: int, record: dict, save) -> None:
    """The evaluation every ``eval_every`` steps, into ``record``; a SIGTERM during it writes the step's record,
    saves the step with the evaluation marked pending, and raises ``Preempted``."""
    try:
        record.update(out.evaluate(st.policy_params(cfg, state, run.model.config.dtype), step))
    except Preempted:
        out.write(record)
        save(pending_eval=True)
        raise Preempted(f"SIGTERM during the evaluation at step {step}: saved a checkpoint at step {step} in "
                        f"{out.ckpt.directory}; the resumed run evaluates it first") from None


def _warn_identical(cfg: TrainConfig, phase: int, stats: dict) -> None:
    """A warning when π_β sampled the same text twice for more than half of a phase's prompts: those prompts give
    no pair (with ``identical_pairs=shrink`` the phase trains on few pairs; with ``resample`` it annotates more
    prompts to fill it). The usual cause is a start that copies its SFT references."""
    same, sampled = stats["identical_pairs_dropped"], stats["prompts_sampled"]
    if same > sampled / 2:
        then = "its steps train only on the others" if cfg.identical_pairs == "shrink" else "it sampled more prompts"
        log.warning(f"phase {phase + 1}: pi_beta sampled the same text twice for {same} of its {sampled} prompts, "
                    f"which give no pair ({then}); a model that copies its SFT references does this: start from "
                    f"a less converged SFT model or raise temperature")


def _warn_gaps(cfg: TrainConfig, dtype, phase: int, record: dict) -> None:
    """A warning when a phase start's gap checks exceed sampler rounding (``LOGP_GAP_TOL_PER_TOKEN`` of the compute
    dtype × the longest response): the policy's forward against the sampler's log-probs (π_θ ≠ π_β) or π_β's own
    forward against them (the sampler's log-probs are not the model's). Either way the DAP loss's reference is not
    what BPO prescribes, and h is off by up to twice the gap."""
    per_token = LOGP_GAP_TOL_PER_TOKEN.get(np.dtype(dtype).name)
    if per_token is None:  # a dtype without a measured tolerance: the gaps are logged, not judged
        return
    tol = per_token * (cfg.max_new_tokens + 1)  # + 1: the EOS that response_eos=append adds
    checks = {"phase/policy_behavior_logp_gap": "the policy's forward (pi_theta, just synced to pi_beta)",
              "phase/behavior_logp_gap": "pi_beta's own forward"}
    for key, who in checks.items():
        if record.get(key, 0.0) > tol:
            log.warning(f"phase {phase + 1}: {who} and the sampler's log-probs of the same responses differ by "
                        f"{record[key]:.3g} nats (rounding stays below {tol:.2g} in {np.dtype(dtype).name}): pi_beta "
                        f"in the loss is not the model that sampled, so its reference is off by up to that much. "
                        f"{key} is in metrics.jsonl; a custom model or a sampling mesh that computes differently "
                        f"can do this")


def _start_phase(cfg: TrainConfig, run, state, phase: int, stop: Preemption):
    """Steps 5 and 1–3 at a phase start: ``(state, this host's pairs, phase stats)``. A preemption during the
    collection saves nothing: the last checkpoint (or the fresh start) already holds this phase's start.

    π_β samples with the train step's own activation-space adapters (``state.behavior_params``). The phase's
    first train step checks π_θ against the sampler from its own forwards (``step.GAP_METRICS``: it would show a
    π_β that is not π_θ). Here ``behavior_logp_gap`` re-scores the phase's first batch with π_β's own params (the
    sampler against a full forward of the same model: a numerics check, the same in every phase) at the first
    phase and then every ``behavior_check_every`` phases."""
    model_config = run.model.config
    if phase > int(state.phase):
        state = st.sync_behavior(cfg, state, model_config.dtype)
    behavior = st.behavior_params(cfg, state, model_config.dtype)
    log.info(f"phase {phase + 1}/{cfg.num_phases}: collecting {cfg.steps_per_phase * cfg.batch_size} pairs "
             f"with pi_beta")
    try:
        pairs, stats = collect_pairs(cfg, run, behavior, jax.random.fold_in(jax.random.key(cfg.seed), phase),
                                     interrupt=stop.check)
    except Preempted:
        raise Preempted(f"SIGTERM while collecting phase {phase + 1}'s pairs: nothing to save; a resume redoes "
                        f"this collection from step {int(state.step)}") from None
    _warn_identical(cfg, phase, stats)
    every = cfg.behavior_check_every
    if phase == 0 or (every and phase % every == 0):
        B, P = run.task.train.local_batch_size, run.task.train.width
        first = distributed.global_rows({k: v[:B] for k, v in pairs.items() if k in BATCH_KEYS}, run.mesh)
        stats["behavior_logp_gap"] = float(behavior_logp_gap(model_config, behavior, first, prompt_len=P,
                                                             share_prompt=cfg.share_prompt))
    return state, pairs, stats
