"""What ``sft`` reports about the base model and each seed's model beside the held-out loss, on the test prompts
of the task ``data`` names (``eval_size`` of them; 0 = all):

- the greedy win rate against the human references, scored by the task's annotator as ``train`` scores its
  step 0 (``bpo_jax.eval.win_rate.score_task``);
- the identical-sample rate (``bpo_jax.eval.diversity``): the share of prompts whose two responses, sampled with
  the settings a ``train`` run from this model samples its pairs with (``temperature``, ``top_k``, ``top_p``,
  ``max_new_tokens``, ``response_eos``), are the same text. Those prompts give an online run no pair; above
  ``HIGH_IDENTICAL`` the report warns, since the model has learned to copy its references and an online run from
  it would train on few pairs.

There is no report when the task has no scorer here: ``sft_data`` rows (their test split has no annotator), or
reward-model data without ``reward_model``.
"""

from __future__ import annotations

import logging

import jax

from bpo_jax.config import TrainConfig
from bpo_jax.eval.diversity import identical_sample_rate
from bpo_jax.eval.win_rate import score_task
from bpo_jax.sample.sampler import Decoding
from bpo_jax.wiring.tasks import Run, annotator_kind, build_task, prepare_tfds, splits, tfds_task

log = logging.getLogger(__name__)

HIGH_IDENTICAL = 0.5  # above this share of identical sample pairs, the report warns


def sft_report(cfg: TrainConfig, sft_run):
    """``report(params, label) -> metrics`` for ``bpo_jax.train.sft.train_seeds`` (``sft_run``: its ``SftRun``),
    or None when the task has no scorer (the module docstring says when)."""
    if cfg.sft_data or (annotator_kind(cfg) == "reward_model" and not cfg.reward_model):
        why = "sft_data rows have no scorer here" if cfg.sft_data else "the task needs reward_model= to score it"
        log.info(f"no win rate or identical-sample rate before and after SFT: {why}")
        return None
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
        _, wr = score_task(cfg, run, params)
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
        return {**wr.metrics(), "eval/identical_sample_rate": same}

    return report
