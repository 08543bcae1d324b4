"""``python -m bpo_jax sft --config configs/<file>_sft.yaml [key=value ...]``: supervised fine-tuning of
``sft_seeds`` adapters (or models), one per seed, the loss on the response tokens only.

It reports the held-out loss before and after each seed (and, on a task with a scorer, the win rate against the
references and the identical-sample rate: ``bpo_jax.wiring.sft_report``), writes ``<run_dir>/adapters/seed_<k>`` as
PEFT folders (full fine-tuning: ``<run_dir>/policies/seed_<k>`` as HF folders) and prints the ``train`` overrides
that start the paper's ensemble from them (``lora_init_from=...``). Rerunning the same command resumes where it
stopped.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


def main(argv=None) -> int:
    from bpo_jax.cli import run_with_config

    return run_with_config("sft", __doc__, "sft_seeds=3 sft_steps=100", _run, argv)


def _run(cfg, trackers, t0) -> int:
    """Load the model and rows, then every seed in turn; the line to pass to ``train`` at the end."""
    from bpo_jax.config import save_config, validate_for_model
    from bpo_jax.data import builders
    from bpo_jax.runtime import distributed, exits
    from bpo_jax.runtime import run_dir as rd
    from bpo_jax.train import sft
    from bpo_jax.train.loop import Preempted, Preemption
    from bpo_jax.wiring.sft_report import sft_report
    from bpo_jax.wiring.tasks import prepare_tfds

    sources = None
    if not cfg.sft_data and cfg.data in builders.BUILDERS:
        sources = prepare_tfds(cfg.data, cfg.data_dir, cfg.tfds_dir, cfg.data_format)
    run = sft.setup(cfg, sources)
    try:
        validate_for_model(cfg, run.model.config.vocab_size, run.model.config.max_position_embeddings)
    except ValueError as err:
        log.error(f"config error: {err}")
        return 2
    steps = sft.steps_per_seed(cfg, len(run.train.ids))
    lora = f"LoRA r={cfg.lora_rank} alpha={cfg.lora_alpha:g}" if cfg.lora_rank else "full fine-tuning"
    cut = f" ({run.dropped[0]} + {run.dropped[1]} over max_prompt_length dropped)" if any(run.dropped) else ""
    log.info(f"bpo_jax sft: {cfg.model}, {lora}, {cfg.sft_seeds} seed(s) x {steps} steps of {cfg.batch_size} rows "
             f"({cfg.lr_schedule} lr {cfg.learning_rate:g}), {len(run.train.ids)} rows from {run.source}, "
             f"{len(run.heldout.ids)} held out{cut}, run_dir={cfg.run_dir}")
    rd.make(cfg.run_dir)
    if distributed.is_primary():
        save_config(cfg, str(rd.path(cfg.run_dir, "config.yaml")))
    with Preemption() as stop:
        try:
            folders = sft.train_seeds(run, stop=stop, trackers=trackers, report=sft_report(cfg, run))
        except Preempted as err:  # the last completed step is on disk; the same command resumes
            log.error(str(err))
            return exits.PREEMPTED
    log.info(f"sft done in {time.time() - t0:.0f} s; start train from these with: {sft.train_command(folders, cfg)}")
    distributed.barrier("bpo_jax.sft.done")
    return 0
