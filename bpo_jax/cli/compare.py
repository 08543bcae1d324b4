"""``python -m bpo_jax compare RUN_A RUN_B [--step N] [--out DIR] [key=value ...]``: two policies head to head on
the same test prompts.

Each of RUN_A and RUN_B is a run directory (its latest checkpoint, or ``--step N``), one checkpoint
(``<run_dir>/checkpoints/<N>``) or a model (an exported policy or any HF folder, a ``.gguf`` file, a shipped
name, a Hub id): ``bpo_jax.train.restore``. The test prompts, the evaluation settings (``eval_size``,
``eval_max_new_tokens``, ...) and the annotator are the first run's (RUN_A's when it is one), with the
overrides on top, as ``evaluate`` takes them (e.g. ``annotator=judge judge_url=... judge_model=...``); a run's
policy is restored as ``evaluate`` restores it, and the two policies must share a tokenizer. Both greedy-decode
the test prompts and the annotator judges each pair (``bpo_jax.eval.compare``: a scorer by the higher score, the
API judge in both orders, a side winning only when both orders agree). It logs one line (the shares of A wins,
B wins and ties, P(A wins) − P(B wins) with its paired bootstrap 95% CI, and with a scorer both sides' win
rates against the references and their paired difference) and writes ``compare_<A>_vs_<B>_<data>.jsonl`` (one
record per prompt) and ``.json`` (the summary) into ``--out`` (default: RUN_A's run directory).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from typing import NamedTuple

log = logging.getLogger(__name__)


class _Plan(NamedTuple):
    cfg: object  # the evaluation's TrainConfig: task, settings, annotator (and the model setup_run loads)
    sources: tuple  # PolicySource of A and B
    configs: tuple  # each side's own TrainConfig (a run's), or None (a model)
    out: str


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bpo_jax compare", description=__doc__.split("\n\n")[0])
    p.add_argument("a", metavar="RUN_A", help="a run directory, a checkpoint folder or a model")
    p.add_argument("b", metavar="RUN_B", help="the same kinds")
    p.add_argument("--step", type=int, help="checkpoint step of a run directory (default: its latest)")
    p.add_argument("--out", help="folder for the records and the summary (default: RUN_A's run directory)")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. eval_size=100 annotator=judge")
    args = p.parse_intermixed_args(argv)  # key=value before or after the options
    from bpo_jax.runtime import distributed, logs
    from bpo_jax.train.checkpoint import Checkpointer
    from bpo_jax.train.restore import checkpoint_step

    logs.setup(primary=distributed.is_primary())
    ckpts, steps = [], []
    try:
        try:  # bad input stops here, before any model loads, as one line
            plan = distributed.agreed(_plan, args)
            for source, cfg in zip(plan.sources, plan.configs):
                ckpts.append(Checkpointer(cfg.run_dir, cfg.keep_checkpoints) if cfg else None)
                steps.append(checkpoint_step(ckpts[-1], source.step if source.step is not None else args.step)
                             if cfg else None)
        except (ValueError, FileNotFoundError) as err:
            log.error(f"error: {err}")
            return 2
        return _compare(plan, ckpts, steps)
    finally:
        for ckpt in filter(None, ckpts):
            ckpt.close()


def _plan(args) -> _Plan:
    """The sources, each run's config and the evaluation's config (the first run's, with the overrides; a model
    as RUN_A is the model the run set-up loads)."""
    from bpo_jax.config import load_config
    from bpo_jax.train.restore import policy_source, run_config

    sources = (policy_source(args.a), policy_source(args.b))
    if args.out is None and not sources[0].is_run:
        raise ValueError(f"RUN_A {args.a!r} is a model, not a run: give --out DIR for the comparison's files")
    configs = tuple(run_config(s.run_dir, args.overrides) if s.is_run else None for s in sources)
    first = next((c for c in configs if c is not None), None)
    out = args.out or sources[0].run_dir
    model = [] if sources[0].is_run else [f"model={sources[0].model}"]
    cfg = (run_config(first.run_dir, [*args.overrides, *model]) if first is not None
           else load_config(None, [*args.overrides, *model, f"run_dir={out}"]))
    return _Plan(cfg, sources, configs, out)


def _compare(plan: _Plan, ckpts, steps) -> int:
    """Load both policies, compare them, write and report."""
    from bpo_jax.eval.compare import Policy, compare_policies, describe, write
    from bpo_jax.train.restore import restore_policy
    from bpo_jax.wiring.tasks import setup_run

    run = setup_run(plan.cfg, train=False)
    labels = _labels(plan.sources, steps)
    policies = []
    for source, cfg, ckpt, step, label in zip(plan.sources, plan.configs, ckpts, steps, labels):
        model, eos = _model(source.model if cfg is None else cfg.model, cfg or plan.cfg, plan.cfg, run)
        params = model.params if ckpt is None else restore_policy(cfg, ckpt, step, model)
        policies.append(Policy(label, model, params, eos))
    comparison = compare_policies(plan.cfg, run, *policies)
    data = os.path.basename(os.path.normpath(plan.cfg.data))
    records, _ = write(plan.out, f"compare_{labels[0]}_vs_{labels[1]}_{data}", comparison)
    log.info(f"{describe(comparison.summary)}. Records: {records}")
    return 0


def _model(name: str, cfg, eval_cfg, run):
    """``(decoder, EOS ids)`` of the model ``name`` with ``cfg``'s numerics: the run set-up's own when it is the
    same model and numerics, else loaded on the run's mesh, refused when its tokenizer is not the run's (the test
    prompts are encoded once, with it)."""
    from bpo_jax.models import load_pretrained
    from bpo_jax.models.hub import resolve_model
    from bpo_jax.runtime import distributed

    numerics = dict(param_dtype=cfg.param_dtype, dtype=cfg.dtype, attention=cfg.attention)
    if resolve_model(name) == resolve_model(eval_cfg.model) and numerics == dict(
            param_dtype=eval_cfg.param_dtype, dtype=eval_cfg.dtype, attention=eval_cfg.attention):
        return run.model, run.eos_token_ids
    model, tokenizer = distributed.agreed(load_pretrained, name, mesh=run.mesh, **numerics)
    if tokenizer is None or tokenizer.get_vocab() != run.tokenizer.get_vocab() or \
            getattr(tokenizer, "chat_template", None) != getattr(run.tokenizer, "chat_template", None):
        raise ValueError(f"{name!r} does not share the tokenizer of {eval_cfg.model!r}: compare needs two policies "
                         f"with one tokenizer and chat template")
    eos = model.config.eos_token_id
    return model, eos if isinstance(eos, tuple) else (eos,)


def _labels(sources, steps) -> list[str]:
    """Each side's name in file names, and ``_step<N>`` for a run: two runs' paths without the folders they share,
    at most the last three (``out/a/x/seed0`` vs ``out/b/x/seed0``: ``a-x-seed0``, ``b-x-seed0``); else each
    one's file or folder name."""
    parts = [(s.run_dir or s.name).rstrip("/").split("/") for s in sources]
    shared = 0
    if all(s.is_run for s in sources):
        while shared < min(map(len, parts)) - 1 and parts[0][shared] == parts[1][shared]:
            shared += 1
    names = [p[max(shared, len(p) - 3):] if shared else [p[-1].removesuffix(".gguf")] for p in parts]
    return [re.sub(r"[^\w.-]", "_", "-".join(name)) + ("" if step is None else f"_step{step}")
            for name, step in zip(names, steps)]
