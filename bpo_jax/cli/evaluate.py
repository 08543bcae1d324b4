"""``python -m bpo_jax evaluate --checkpoint RUN_DIR [--step N] [--data TASK] [key=value ...]``: the win rate of
a trained policy against the human references.

It reloads the run's ``config.yaml`` (written by ``train``), restores the checkpoint (the latest, or step N:
with several processes the primary host picks it from its listing, and every host restores that one),
merges the policy, greedy-decodes the test prompts (``eval_max_new_tokens``; the paper uses 128) and scores
responses and references with the run's annotator, or with the one the overrides name (e.g.
``reward_model=<folder>``). It prints the win rate with its bootstrap 95% CI, appends it to
``RUN_DIR/eval.jsonl`` (and to the run's trackers, as ``evaluate_<data>/...``) and writes every prompt,
response, reference and score to ``RUN_DIR/eval_step<N>_<data>.jsonl``.
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bpo_jax evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="a run directory made by `train`")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--data", help="task to evaluate on (minisum, a folder, tldr, hh_helpful, hh_harmless)")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. eval_size=100 data_dir=/data/tldr")
    args = p.parse_args(argv)
    from bpo_jax.runtime import distributed, logs
    from bpo_jax.train.checkpoint import Checkpointer
    from bpo_jax.train.restore import checkpoint_step

    logs.setup(primary=distributed.is_primary())
    try:  # config errors (ConfigError is a ValueError) stop here, before any compute, as "config error: ..."
        cfg = distributed.agreed(_checked_config, args)  # host-local reads: one outcome for every host
    except ValueError as err:
        log.error(f"config error: {err}")
        return 2
    ckpt = Checkpointer(cfg.run_dir, cfg.keep_checkpoints)
    try:
        try:
            step = checkpoint_step(ckpt, args.step)
        except ValueError as err:
            log.error(f"error: {err}")
            return 2
        return _evaluate(cfg, ckpt, step)
    finally:
        ckpt.close()


def _checked_config(args):
    """The run's saved ``config.yaml`` with the command's overrides (``--data`` one of them), checked against the
    trackers; a run directory without one is refused."""
    from bpo_jax.runtime.trackers import check_available
    from bpo_jax.train.restore import run_config

    cfg = run_config(args.checkpoint, list(args.overrides) + ([f"data={args.data}"] if args.data else []))
    check_available(cfg.tracker)  # before any compute
    return cfg


def _evaluate(cfg, ckpt, step: int) -> int:
    """Restore ``step``, score π_θ's greedy responses on the test set, record and report the win rate."""
    from bpo_jax.eval.win_rate import score_task, scores_file, write_scores
    from bpo_jax.runtime import run_dir as rd
    from bpo_jax.runtime.trackers import log_evaluation
    from bpo_jax.train.restore import restore_policy
    from bpo_jax.wiring.lifecycle import warn_if_collapsed
    from bpo_jax.wiring.tasks import setup_run

    run = setup_run(cfg, train=False)
    task = run.task
    policy = restore_policy(cfg, ckpt, step, run.model)  # π_θ as the train step runs it
    result, wr = score_task(cfg, run, policy)
    evals = rd.JsonlLog(rd.path(cfg.run_dir, "eval.jsonl"))
    metrics = {**wr.metrics(), **result.response_metrics()}
    evals.append({"step": step, "data": cfg.data, **metrics})
    evals.flush()  # a remote run_dir's line: written now, not at exit
    log_evaluation(cfg, step, metrics)
    detail = scores_file(cfg.run_dir, step, cfg.data)
    write_scores(detail, task.eval_prompts, task.references, result)
    cut = f" ({task.truncated} test prompts cut to max_prompt_length)" if task.truncated else ""
    log.info(f"{cfg.run_dir} step {step} on {cfg.data}{cut}: {wr.describe()}; mean {task.score_name} "
             f"{wr.mean_score:.3f} vs references {wr.mean_reference_score:.3f}. Responses: {detail}")
    warn_if_collapsed(step, result.responses)
    return 0
