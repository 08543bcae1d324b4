"""``python -m bpo_jax train --config configs/<file>.yaml [key=value ...]``: run (or resume) online BPO.

On the shipped demo task it reports the win rate of the greedy policy against the human references under the
gold reward, before and after training, and writes everything to ``<run_dir>/metrics.jsonl``.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


def main(argv=None) -> int:
    from bpo_jax.cli import run_with_config

    return run_with_config("train", __doc__, "total_steps=4 reference=sft", _run, argv)


def _run(cfg, trackers, t0) -> int:
    """The run: its parts, the SFT start, step 0's evaluation, the loop, the final evaluation and the finish."""
    from bpo_jax.config import save_config, validate_for_model
    from bpo_jax.runtime import distributed, exits
    from bpo_jax.runtime import run_dir as rd
    from bpo_jax.train import loop
    from bpo_jax.train import state as st
    from bpo_jax.wiring import lifecycle
    from bpo_jax.wiring.tasks import setup_run

    run = setup_run(cfg)
    mcfg = run.model.config
    try:
        validate_for_model(cfg, mcfg.vocab_size, mcfg.max_position_embeddings)
        lora_init, start = lifecycle.sft_start(cfg, run.model.params)
    except ValueError as err:
        log.error(f"config error: {err}")
        return 2
    log.info(lifecycle.describe(cfg, run.task))
    rd.make(cfg.run_dir)
    if distributed.is_primary():
        save_config(cfg, str(rd.path(cfg.run_dir, "config.yaml")))  # what `python -m bpo_jax evaluate` reloads
    metrics = rd.JsonlLog(rd.path(cfg.run_dir, "metrics.jsonl"))  # its one writer: step 0, the loop, the end
    with loop.Preemption() as stop:  # SIGTERM from here on: every host stops at the next check, together
        evaluate = lifecycle.Evaluator(cfg, run, start, interrupt=stop.check)
        try:
            before = evaluate.step0_metrics(metrics, trackers)
            state = loop.train(cfg, run, lora_init=lora_init, evaluate=evaluate if cfg.eval_every else None,
                               stop=stop, trackers=trackers, metrics=metrics)
            after = evaluate(st.policy_params(cfg, state, mcfg.dtype), cfg.total_steps)
        except loop.Preempted as err:  # the last completed state is on disk; the same command resumes
            log.error(str(err))
            return exits.PREEMPTED
    lifecycle.finish_run(cfg, run, state, after, metrics, trackers)
    log.info(f"win rate vs human references: {100 * before['eval/win_rate']:.1f}% before -> "
             f"{100 * after['eval/win_rate']:.1f}% after training ({time.time() - t0:.0f} s)")
    distributed.barrier("bpo_jax.train.done")  # every host leaves together, after process 0's export and plot
    return 0
