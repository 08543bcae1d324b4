"""``python -m bpo_jax train --config configs/<file>.yaml [key=value ...]``: run (or resume) online BPO.

On the shipped demo task it prints the win rate of the greedy policy against the human references under the
gold reward, before and after training, and writes everything to ``<run_dir>/metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bpo_jax train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML file in configs/ (defaults apply to missing keys)")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. total_steps=4 reference=sft")
    args = p.parse_args(argv)

    from bpo_jax.config import ConfigError, load_config
    from bpo_jax.runtime.trackers import check_available, open_trackers

    try:
        cfg = load_config(args.config, args.overrides)
        check_available(cfg.tracker)  # a missing wandb stops the run here, before any compute
    except (ConfigError, ValueError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2

    import jax

    from bpo_jax.config import validate_for_processes
    from bpo_jax.runtime import cluster, distributed

    cluster.enable_compilation_cache(cfg.run_dir)  # a restart of this run reuses the compiled programs
    try:  # settings that need the process and device counts, a run_dir every host sees, the same run on resume
        validate_for_processes(cfg, distributed.process_count(), jax.device_count())
        distributed.check_shared_dir(cfg.run_dir)
        check_same_run(cfg)
    except ValueError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    t0 = time.time()
    trackers = open_trackers(cfg)  # the primary host's tensorboard / W&B run: every record below goes there too
    try:
        return _run(cfg, trackers, t0)
    finally:
        trackers.close()


def _run(cfg, trackers, t0) -> int:
    """The run itself (``main`` after the config checks), logging each metrics record to ``trackers``."""
    from bpo_jax.config import save_config, validate_for_model
    from bpo_jax.data.tasks import setup_run
    from bpo_jax.runtime import distributed
    from bpo_jax.runtime import run_dir as rd
    from bpo_jax.train import loop
    from bpo_jax.train import state as st

    say = print if distributed.is_primary() else (lambda *a, **k: None)  # noqa: E731  one host speaks
    run = setup_run(cfg)
    mcfg = run.model.config
    try:
        validate_for_model(cfg, mcfg.vocab_size, mcfg.max_position_embeddings)
        lora_init, start = _sft_start(cfg, run.model.params)
    except ValueError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    _say_setting(cfg, run.task, say)
    rd.make(cfg.run_dir)
    if distributed.is_primary():
        save_config(cfg, str(rd.path(cfg.run_dir, "config.yaml")))  # what `python -m bpo_jax evaluate` reloads
    metrics = rd.path(cfg.run_dir, "metrics.jsonl")
    stop = loop.Preemption().__enter__()  # SIGTERM from here on: every host stops at the next check, together
    evaluate, setting = _evaluator(cfg, run, start, stop, say)
    logged = [r for r in rd.read_jsonl(metrics) if r.get("step") == 0 and "eval/win_rate" in r
              and all(r.get(k) == v for k, v in setting.items())]
    try:
        if logged:  # a resumed run: the starting model was evaluated by the first command, on the same test set
            before = {k: v for k, v in logged[-1].items() if k.startswith("eval/")}
        else:
            before = evaluate(start, 0)
            rd.append_jsonl(metrics, {"step": 0, **before})
            trackers.log({"step": 0, **before})
        state = loop.train(cfg, model_config=mcfg, tokenizer=run.tokenizer, base=run.model.params,
                             prompts=run.task.train, annotator=run.task.annotator, mesh=run.mesh,
                             eos_token_ids=run.eos_token_ids, reference=run.reference, lora_init=lora_init,
                             evaluate=evaluate if cfg.eval_every else None, stop=stop, log=say, trackers=trackers)
        after = evaluate(st.policy_params(cfg, state, mcfg.dtype), cfg.total_steps)
    except loop.Preempted as err:  # the last completed state is on disk; the same command resumes
        print(str(err), file=sys.stderr)
        return 143
    finally:
        stop.__exit__()
    rd.append_jsonl(metrics, {"step": cfg.total_steps, "final": True, **after})
    trackers.log({"step": cfg.total_steps, **after})
    _finish(cfg, run, state, say)
    say(f"win rate vs human references: {100 * before['eval/win_rate']:.1f}% before -> "
        f"{100 * after['eval/win_rate']:.1f}% after training ({time.time() - t0:.0f} s)")
    distributed.barrier("bpo_jax.train.done")  # every host leaves together, after process 0's export and plot
    return 0


def _say_setting(cfg, task, say) -> None:
    """The run's first line: model, schedule, loss, adapters, task and where it writes."""
    from bpo_jax.runtime import distributed

    lora = f"LoRA r={cfg.lora_rank} x{cfg.ensemble_size}" if cfg.lora_rank else "full fine-tuning"
    hosts = f", {distributed.process_count()} processes" if distributed.process_count() > 1 else ""
    say(f"bpo_jax train: {cfg.model}, T={cfg.total_steps}, F={cfg.num_phases}, reference={cfg.reference}, "
        f"{cfg.loss_type} beta={cfg.beta}, {lora}, task {task.name}, {len(task.references)} test prompts"
        f"{f' ({task.truncated} cut to max_prompt_length)' if task.truncated else ''}, run_dir={cfg.run_dir}{hosts}")


def _sft_start(cfg, base):
    """``(lora_init, start)``: the ensemble's starting factors for a fresh run from ``lora_init_from`` (None
    otherwise, and on resume: the checkpoint holds them) and the SFT model the step-0 evaluation and the drift
    measure use: the base, or base + the adapters' merge (by ``ensemble_merge``) in activation space, as π_β
    samples. A bad adapter folder is a ValueError."""
    if not cfg.lora_init_from:
        return None, base
    from bpo_jax.models.peft_adapters import read_ensemble
    from bpo_jax.train import lora
    from bpo_jax.train import state as st

    lora_init = read_ensemble(cfg.lora_init_from, {t: base["layers"][t].shape for t in cfg.lora_targets},
                              rank=cfg.lora_rank, scale=cfg.lora_scale, targets=cfg.lora_targets)
    start = lora.attach_merged(base, st.place_like_base(lora_init, base), cfg.lora_scale, cfg.ensemble_merge)
    return (None if _has_checkpoint(cfg) else lora_init), start


def _evaluator(cfg, run, start, stop, say):
    """``(evaluate(params, step) -> metrics, setting)``: the test-set evaluation the run makes at step 0, every
    ``eval_every`` steps and at T (an evaluation of a step already made in this process is not repeated), and
    what its figure depends on beyond the model (``eval_size`` and ``eval_max_new_tokens`` may change on resume:
    a stored step-0 result is reused only when it was made with the same setting)."""
    from bpo_jax.eval.win_rate import score_test_set, scores_file, win_rate_from_scores, write_scores

    task, mcfg = run.task, run.model.config
    setting = {"eval/num_prompts": len(task.references), "eval/max_new_tokens": cfg.eval_max_new_tokens}
    done: dict = {}  # step -> metrics

    def evaluate(params, step):
        if step in done:  # the loop's periodic evaluation at step T is also the final one
            return done[step]
        say(f"step {step}: evaluating on {len(task.references)} test prompts")
        result = score_test_set(params, mcfg, run.tokenizer, task.eval_annotator, task.eval_prompts, task.eval_ids,
                                task.eval_mask, task.references, max_new_tokens=cfg.eval_max_new_tokens,
                                eos_token_ids=run.eos_token_ids, mesh=run.mesh, batch_size=cfg.eval_batch_size,
                                interrupt=stop.check, reference_params=start if cfg.eval_sft_logratio else None)
        wr = win_rate_from_scores(result.scores, result.reference_scores)
        drift = {} if result.logratio_sft is None else {"eval/sft_logratio": float(result.logratio_sft.mean())}
        say(f"step {step}: {wr.describe()}; mean {task.score_name} {wr.mean_score:.3f} vs references "
            f"{wr.mean_reference_score:.3f}; e.g. {result.responses[0][:100]!r}")
        if step == cfg.total_steps:  # the final model's per-prompt scores, as `evaluate` writes them
            write_scores(scores_file(cfg.run_dir, step, cfg.data), task.eval_prompts, task.references, result)
        done[step] = {**wr.metrics(), **drift, **setting}
        return done[step]

    return evaluate, setting


def _finish(cfg, run, state, say) -> None:
    """After training: the merged policy as an HF folder and the adapters as PEFT folders (``export_policy``),
    and the run's plot (primary host)."""
    from bpo_jax.runtime import distributed
    from bpo_jax.runtime import run_dir as rd
    from bpo_jax.train import state as st

    if cfg.export_policy:
        from bpo_jax.models import Decoder, save_pretrained

        out = save_pretrained(Decoder.from_params(run.model.config, st.export_params(cfg, state)), run.tokenizer,
                              str(rd.path(cfg.run_dir, "policy")))
        say(f"policy exported as an HF folder: {out}")
        if cfg.lora_rank:
            from bpo_jax.models.peft_adapters import write_ensemble

            factors = distributed.gather_to_host(state.trainable)
            if distributed.is_primary():
                out = str(rd.path(cfg.run_dir, "adapters"))
                write_ensemble(out, factors, rank=cfg.lora_rank, alpha=cfg.lora_alpha, base_model=cfg.model,
                               merge=cfg.ensemble_merge)
                say(f"LoRA adapters exported as PEFT folders: {out}/member_<i> and {out}/merged")
    if distributed.is_primary():
        from bpo_jax.eval.plot import plot_runs

        plot_path = str(rd.path(cfg.run_dir, "plot.png"))
        plot_runs([cfg.run_dir], plot_path)
        say(f"plot: {plot_path}")


def _has_checkpoint(cfg) -> bool:
    from bpo_jax.runtime import run_dir as rd

    ckpts = rd.path(cfg.run_dir, "checkpoints")
    return ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir())


def check_same_run(cfg) -> None:
    """On resume (``run_dir`` holds a checkpoint), refuse run-defining settings that differ from the saved
    ``config.yaml``, before anything is loaded: one line per key, and the two ways out."""
    from bpo_jax.config import ConfigError, load_config, run_identity_changes
    from bpo_jax.runtime import run_dir as rd

    saved_path = rd.path(cfg.run_dir, "config.yaml")
    if not (saved_path.exists() and _has_checkpoint(cfg)):
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
