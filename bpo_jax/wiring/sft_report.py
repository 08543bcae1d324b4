"""What ``sft`` reports about the base model and each seed's model beside the held-out loss, on the test prompts
of the task ``data`` names (``eval_size`` of them; 0 = all):

- the greedy win rate against the human references, scored by the task's annotator as ``train`` scores its
  step 0 (``bpo_jax.eval.win_rate.score_task``);
- the identical-sample rate (``bpo_jax.eval.diversity``): the share of prompts whose two responses, sampled with
  the settings a ``train`` run from this model samples its pairs with (``temperature``, ``top_k``, ``top_p``,
  ``max_new_tokens``, ``response_eos``), are the same text. Those prompts give an online run no pair; above
  ``HIGH_IDENTICAL`` the report warns, since the model has learned to copy its references and an online run from
  it would train on few pairs.

With ``sft_data`` (official ``{prompt, label}`` rows) the prompts are its held-out rows (``eval_size`` of them)
and their labels the references, scored by the reward model or the judge (``annotator``): the official rows
carry no gold summaries for ROUGE. There is no report when nothing can score: official rows or reward-model data
without ``reward_model`` (or a judge).
"""

from __future__ import annotations

import logging

import jax

from bpo_jax.config import TrainConfig
from bpo_jax.data.prompts import encode, left_pad
from bpo_jax.data.sft import sft_rows
from bpo_jax.eval.diversity import identical_sample_rate
from bpo_jax.eval.win_rate import score_task
from bpo_jax.sample.sampler import Decoding
from bpo_jax.wiring.tasks import Run, Task, annotator_kind, annotators, build_task, prepare_tfds, splits, tfds_task

log = logging.getLogger(__name__)

HIGH_IDENTICAL = 0.5  # above this share of identical sample pairs, the report warns


def sft_report(cfg: TrainConfig, sft_run):
    """``report(params, label) -> metrics`` for ``bpo_jax.train.sft.train_seeds`` (``sft_run``: its ``SftRun``),
    or None when the task has no scorer (the module docstring says when)."""
    kind = "reward_model" if cfg.sft_data and cfg.annotator == "auto" else annotator_kind(cfg)
    if kind == "reward_model" and not cfg.reward_model:
        log.info(f"no win rate or identical-sample rate before and after SFT: "
                 f"{'the official rows' if cfg.sft_data else 'the task'} need reward_model= (or annotator=judge) to "
                 f"score them")
        return None
    if cfg.sft_data:
        task = _official_task(cfg.replace(annotator=kind), sft_run)
    else:
        tfds = tfds_task(cfg)
        sources = prepare_tfds(*tfds, cfg.tfds_dir, cfg.data_format, splits(cfg)) if tfds else None
        task = build_task(cfg, sft_run.tokenizer, mesh=sft_run.mesh, train=False, sources=sources)
    config = sft_run.model.config
    eos = config.eos_token_id if isinstance(config.eos_token_id, tuple) else (config.eos_token_id,)
    run = Run(sft_run.mesh, sft_run.model, sft_run.tokenizer, None, eos, task)
    decoding = Decoding(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                        top_p=cfg.top_p, eos_token_ids=eos, pad_token_id=config.pad_token_id or 0,
                        append_eos=cfg.response_eos == "append")

    def report(params, label: str) -> dict:
        result, wr = score_task(cfg, run, params)
        same = identical_sample_rate(params, config, sft_run.tokenizer, task.eval_ids, task.eval_mask, decoding,
                                     rng=jax.random.key(cfg.seed), mesh=sft_run.mesh,
                                     batch_size=cfg.sampling_batch_size or cfg.eval_batch_size,
                                     sampling_layout=cfg.sampling_layout)
        log.info(f"{label}: {wr.describe()}; mean {task.score_name} {wr.mean_score:.3f} vs references "
                 f"{wr.mean_reference_score:.3f}; identical sample pairs at temperature {cfg.temperature:g}: "
                 f"{100 * same:.1f}%")
        if same > HIGH_IDENTICAL:
            log.warning(f"{label}: {100 * same:.0f}% of the test prompts' two samples are the same text: an online "
                        f"run from this model gets no pair from those prompts (train's identical_pairs). It has "
                        f"learned to copy its references; train fewer steps (sft_steps) or at a lower learning_rate")
        return {**wr.metrics(), **result.response_metrics(), "eval/identical_sample_rate": same}

    return report


def _official_task(cfg: TrainConfig, sft_run) -> Task:
    """The report's test set from official rows: the first ``eval_size`` held-out rows (0 = all) whose prompt fits
    ``max_prompt_length``, their labels as the references, the config's reward model or judge as the scorer."""
    rows = sft_rows(cfg).heldout
    rows = rows[:cfg.eval_size] if cfg.eval_size else rows
    encoded = [(encode(sft_run.tokenizer, p), p, r) for p, r in rows]
    kept = [(ids, p, r) for ids, p, r in encoded if len(ids) <= cfg.max_prompt_length]
    if not kept:
        raise ValueError(f"no held-out SFT row's prompt fits max_prompt_length={cfg.max_prompt_length}")
    ids, mask = left_pad([x[0] for x in kept])
    annotator, eval_annotator, score_name = annotators(cfg, None, sft_run.mesh)
    return Task("sft_data", None, [x[1] for x in kept], ids, mask, [x[2] for x in kept], annotator, score_name,
                eval_annotator=eval_annotator)
