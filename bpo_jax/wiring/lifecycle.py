"""A train run's life around the online loop (``bpo_jax.train.loop``): the checks before it starts, the SFT
model it starts from, its evaluations at step 0, every ``eval_every`` steps and at T, and its finish (the policy
and adapters exported, the plot). ``python -m bpo_jax train`` is these calls in order; ``sft`` shares the checks."""

from __future__ import annotations

import logging

from bpo_jax.config import ConfigError, load_config, run_identity_changes
from bpo_jax.runtime import distributed
from bpo_jax.runtime import run_dir as rd
from bpo_jax.train.checkpoint import has_checkpoint

log = logging.getLogger(__name__)


def checked_config(config_path, overrides):
    """The config (``train`` and ``sft``), checked against the trackers, the processes and devices, the shared
    run_dir and a resumed run's saved settings; and the primary host's open trackers (every metrics record goes
    there too)."""
    import jax

    from bpo_jax.config import validate_for_processes
    from bpo_jax.runtime import cluster, logs
    from bpo_jax.runtime.trackers import check_available, open_trackers

    cfg = load_config(config_path, overrides)
    check_available(cfg.tracker)  # a missing wandb stops the run here
    logs.setup(primary=distributed.is_primary())  # one host speaks
    cluster.enable_compilation_cache(cfg.run_dir)  # a restart of this run reuses the compiled programs
    validate_for_processes(cfg, distributed.process_count(), jax.device_count())
    distributed.check_shared_dir(cfg.run_dir)
    check_same_run(cfg)
    return cfg, open_trackers(cfg)


def check_same_run(cfg) -> None:
    """On resume (``run_dir`` holds a checkpoint), refuse run-defining settings that differ from the saved
    ``config.yaml``, before anything is loaded: one line per key, and the two ways out."""
    saved_path = rd.path(cfg.run_dir, "config.yaml")
    if not (saved_path.exists() and has_checkpoint(cfg.run_dir)):
        return
    try:
        saved = load_config(str(saved_path))
    except ConfigError as err:
        raise ConfigError(f"cannot read the run's saved config to resume it: {err}") from None
    changes = run_identity_changes(saved, cfg)
    if changes:
        lines = "\n  ".join(changes)
        raise ConfigError(f"{cfg.run_dir} holds a run started with other settings; resuming would silently change "
                          f"it:\n  {lines}\nRerun with the original settings (see {saved_path}), or pass a new "
                          f"run_dir=... to start another run")


def describe(cfg, task) -> str:
    """The run's first line: model, schedule, loss, adapters, task and where it writes."""
    lora = f"LoRA r={cfg.lora_rank} x{cfg.ensemble_size}" if cfg.lora_rank else "full fine-tuning"
    hosts = f", {distributed.process_count()} processes" if distributed.process_count() > 1 else ""
    cut = f" ({task.truncated} cut to max_prompt_length)" if task.truncated else ""
    return (f"bpo_jax train: {cfg.model}, T={cfg.total_steps}, F={cfg.num_phases}, reference={cfg.reference}, "
            f"{cfg.loss_type} beta={cfg.beta}, {lora}, task {task.name}, {len(task.references)} test prompts"
            f"{cut}, run_dir={cfg.run_dir}{hosts}")


def sft_start(cfg, base):
    """``(lora_init, start)``: the ensemble's starting factors for a fresh run from ``lora_init_from`` (None
    otherwise, and on resume: the checkpoint holds them) and the SFT model the step-0 evaluation and the drift
    measure use: the base, or base + the adapters' merge (by ``ensemble_merge``) in activation space, as π_β
    samples. A bad adapter folder is a ValueError."""
    if not cfg.lora_init_from:
        return None, base
    from bpo_jax.models import lora
    from bpo_jax.models.peft_adapters import read_ensemble
    from bpo_jax.train import state as st

    lora_init = distributed.agreed(  # host-local reads: a failure on one host stops every host alike
        read_ensemble, cfg.lora_init_from, {t: base["layers"][t].shape for t in cfg.lora_targets},
        rank=cfg.lora_rank, scale=cfg.lora_scale, targets=cfg.lora_targets)
    start = lora.attach_merged(base, st.place_like_base(lora_init, base), cfg.lora_scale, cfg.ensemble_merge)
    return (None if has_checkpoint(cfg.run_dir) else lora_init), start


class Evaluator:
    """``evaluator(params, step) -> metrics``: the test-set evaluation a run makes at step 0, every
    ``eval_every`` steps and at T (a step already evaluated in this process is not repeated). ``setting`` is what
    a figure depends on beyond the model (``eval_size`` and ``eval_max_new_tokens`` may change on resume: a
    stored step-0 result is reused only when it was made with the same setting, ``step0_metrics``)."""

    def __init__(self, cfg, run, start, interrupt=None):
        self.cfg, self.run, self.start, self.interrupt = cfg, run, start, interrupt
        self.setting = {"eval/num_prompts": len(run.task.references), "eval/max_new_tokens": cfg.eval_max_new_tokens}
        self.done: dict = {}  # step -> metrics

    def __call__(self, params, step: int) -> dict:
        from bpo_jax.eval.win_rate import score_task, scores_file, write_scores

        cfg, task = self.cfg, self.run.task
        if step in self.done:  # the loop's periodic evaluation at step T is also the final one
            return self.done[step]
        log.info(f"step {step}: evaluating on {len(task.references)} test prompts")
        result, wr = score_task(cfg, self.run, params, interrupt=self.interrupt,
                                reference_params=self.start if cfg.eval_sft_logratio else None)
        log.info(f"step {step}: {wr.describe()}; mean {task.score_name} {wr.mean_score:.3f} vs references "
                 f"{wr.mean_reference_score:.3f}; e.g. {result.responses[0][:100]!r}")
        if step == cfg.total_steps:  # the final model's per-prompt scores, as `evaluate` writes them
            write_scores(scores_file(cfg.run_dir, step, cfg.data), task.eval_prompts, task.references, result)
        self.done[step] = {**wr.metrics(), **result.response_metrics(), **self.setting}
        warn_if_collapsed(step, result.responses)
        return self.done[step]

    def step0_metrics(self, metrics: rd.JsonlLog, trackers) -> dict:
        """The starting model's metrics: those a first command logged with the same setting (a resumed run),
        else evaluated now and logged to ``metrics`` (the writer of the run's ``metrics.jsonl`` that the loop
        and ``finish_run`` share) and ``trackers``."""
        logged = [r for r in metrics.read() if r.get("step") == 0 and "eval/win_rate" in r
                  and all(r.get(k) == v for k, v in self.setting.items())]
        if logged:
            return {k: v for k, v in logged[-1].items() if k.startswith("eval/")}
        before = self(self.start, 0)
        metrics.append({"step": 0, **before})
        trackers.log({"step": 0, **before})
        return before


COLLAPSE_SHARE = 0.1  # the share of test prompts answered with one text above which an evaluation warns
COLLAPSE_MIN_PROMPTS = 20  # ... on at least this many test prompts (fewer: too coarse to tell)


def warn_if_collapsed(step: int, responses: list) -> None:
    """Warn when one greedy response answers at least ``COLLAPSE_SHARE`` of the test prompts: different prompts
    should get different answers, and a policy that gives many of them one text (a DPO run that pushed both
    responses of its pairs down can end on one that describes the instruction) has collapsed, whatever its win
    rate."""
    from bpo_jax.eval.win_rate import response_shares

    if len(responses) < COLLAPSE_MIN_PROMPTS:
        return
    distinct, top, text = response_shares(responses)
    if top >= COLLAPSE_SHARE:
        log.warning(f"warning: step {step}: {100 * top:.0f}% of the {len(responses)} test prompts get the same "
                    f"greedy response ({text[:80]!r}; {100 * distinct:.0f}% of the responses are distinct "
                    f"texts): the policy may be collapsing onto a few responses")


def finish_run(cfg, run, state, after: dict, metrics: rd.JsonlLog, trackers) -> None:
    """After training: the final metrics logged (to ``metrics``, then flushed, and ``trackers``), the merged
    policy as an HF folder and the adapters as PEFT folders (``export_policy``), and the run's plot (primary
    host)."""
    from bpo_jax.train import state as st

    metrics.append({"step": cfg.total_steps, "final": True, **after})
    metrics.flush()  # a remote run_dir's waiting lines: the plot below reads the file
    trackers.log({"step": cfg.total_steps, **after})
    if cfg.export_policy:
        from bpo_jax.models import Decoder, save_pretrained

        out = save_pretrained(Decoder.from_params(run.model.config, st.export_params(cfg, state)), run.tokenizer,
                              str(rd.path(cfg.run_dir, "policy")))
        log.info(f"policy exported as an HF folder: {out}")
        if cfg.lora_rank:
            from bpo_jax.models.peft_adapters import write_ensemble

            factors = distributed.gather_to_host(state.trainable)
            if distributed.is_primary():
                out = str(rd.path(cfg.run_dir, "adapters"))
                write_ensemble(out, factors, rank=cfg.lora_rank, alpha=cfg.lora_alpha, base_model=cfg.model,
                               merge=cfg.ensemble_merge)
                log.info(f"LoRA adapters exported as PEFT folders: {out}/member_<i> and {out}/merged")
    if distributed.is_primary():
        from bpo_jax.eval.plot import plot_runs

        plot_path = str(rd.path(cfg.run_dir, "plot.png"))
        plot_runs([cfg.run_dir], plot_path)
        log.info(f"plot: {plot_path}")
