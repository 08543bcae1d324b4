"""Where the wall time of one phase of the online BPO loop goes: sampling, decoding, annotation, training, ...

    python bench/online_loop.py [--config configs/smollm2_cpu_demo.yaml] [--steps K] [--json out.json] \
        [key=value ...]        e.g. total_steps=4 batch_size=4 eval_size=8 max_new_tokens=16

How: the real loop, unmodified. The script loads the run as ``python -m bpo_jax train`` does
(``tasks.setup_run``: model, tokenizer, prompt stream, annotator; timed as "setup", outside the phase), then
calls ``bpo_jax.train.loop.train`` itself for one phase of K steps (``total_steps=K, num_phases=1``, in a fresh
temporary ``run_dir``), with timing proxies monkeypatched over the names the loop looks up at call time, so the
loop runs its own code in its own order and each building block's time lands in its row:

  sampling             ``loop.generate`` (π_β samples two responses per prompt; compiles on its first call)
  unstack π_β          ``loop.unstack_layers`` (the sampler's per-layer layout, once per phase)
  decoding to text     ``tokenizer.decode`` as the loop calls it (the tokenizer handed to the loop is a proxy)
  pairs building       ``loop.distinct`` + ``loop.build_pairs`` (identical-pair drop, chosen/rejected
                       layout; both count as calls of this row)
  annotation           the annotator's ``__call__`` (a proxy around the task's annotator)
  behavior log-prob check  ``loop.behavior_logp_gap`` / ``member_logp_gaps`` (jitted; compile on first call)
  train steps          the step function ``loop.make_train_step`` returns (first call = compile + step)
  metrics writing      ``loop._Outputs.write`` (metrics.jsonl, TensorBoard when installed)
  checkpointing        ``Checkpointer.save`` (synchronous) and ``close``, as the loop calls them at the phase end
  behavior merge       ``state.behavior_params`` (π_β at the phase start; LoRA: the merged adapter attached)
  behavior sync        ``state.sync_behavior`` (π_β ← π_θ): a one-phase run never reaches the next phase's
                       start, so the script calls it once on the returned state, as the loop would there
  evaluation           ``win_rate.score_test_set`` on the policy after the phase, as ``python -m bpo_jax train``
                       runs it (greedy decode of the test set + scoring against the references; split into its
                       generate / decode / scoring parts by the same kind of proxies); also inside the loop when
                       ``eval_every`` is set
  loop overhead        the loop's wall time minus every row inside it (state creation, jit wrapper set-up, the
                       prompt stream, ``global_rows``, progress bars, host transfers of metrics)

Each proxy blocks on its outputs (``jax.block_until_ready``) so that asynchronously dispatched work is charged
to the row that issued it; the loop itself would overlap a little of that dispatch, so the rows may add up to
slightly more than an unproxied run. Per row: calls, total, the first call (compilation lands here) and the
median of the other calls. Compilation is not excluded: it is part of what a phase costs in a fresh process.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")  # the checkout: its configs/
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Rows in the order the loop reaches them, and the brief's categories they add up to.
ROWS = (("behavior merge", "behavior sync"), ("unstack π_β", "sampling"), ("sampling", "sampling"),
        ("decoding to text", "decoding"), ("pairs building", "annotation"), ("annotation", "annotation"),
        ("behavior log-prob check", "training"), ("train steps", "training"), ("metrics writing", "other"),
        ("checkpointing", "checkpointing"), ("loop overhead", "other"), ("behavior sync", "behavior sync"),
        ("eval: generate", "evaluation"), ("eval: decoding", "evaluation"), ("eval: scoring", "evaluation"),
        ("eval: other", "evaluation"))


class Timings:
    def __init__(self):
        self.calls: dict[str, list[float]] = defaultdict(list)

    def add(self, name: str, seconds: float) -> None:
        self.calls[name].append(seconds)

    def wrap(self, name: str, fn, *, block: bool = False):
        import jax

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if block:
                jax.block_until_ready(out)
            self.add(name, time.perf_counter() - t0)
            return out

        return timed

    def total(self, name: str) -> float:
        return sum(self.calls.get(name, ()))


class _Proxy:
    """Forwards every attribute to ``inner``; the methods named in ``timed`` are timed into rows."""

    def __init__(self, inner, timings: Timings, timed: dict):
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_timed", {m: timings.wrap(row, getattr(inner, m)) for m, row in timed.items()})

    def __getattr__(self, name):
        return self._timed[name] if name in self._timed else getattr(self._inner, name)

    def __call__(self, *args, **kwargs):
        return self.__getattr__("__call__")(*args, **kwargs)

    def __len__(self):
        return len(self._inner)


def run(args) -> dict:
    import jax

    from bpo_jax.config import ConfigError, load_config, validate_for_model, validate_for_processes
    from bpo_jax.data.tasks import setup_run
    from bpo_jax.eval import win_rate as ev
    from bpo_jax.runtime import distributed
    from bpo_jax.train import checkpoint, loop
    from bpo_jax.train import state as st

    try:
        cfg = load_config(args.config, args.overrides)
        steps = args.steps or cfg.steps_per_phase
        run_dir = tempfile.mkdtemp(prefix="bpo_bench_online_")
        cfg = cfg.replace(total_steps=steps, num_phases=1, run_dir=run_dir)
        validate_for_processes(cfg, distributed.process_count(), jax.device_count())
    except (ConfigError, ValueError) as err:
        sys.exit(f"config error: {err}")

    t0 = time.perf_counter()
    setup = setup_run(cfg)
    mcfg, task = setup.model.config, setup.task
    try:
        validate_for_model(cfg, mcfg.vocab_size, mcfg.max_position_embeddings)
    except ValueError as err:
        sys.exit(f"config error: {err}")
    setup_s = time.perf_counter() - t0

    tm = Timings()
    patches = {
        (loop, "generate"): tm.wrap("sampling", loop.generate),
        (loop, "unstack_layers"): tm.wrap("unstack π_β", loop.unstack_layers, block=True),
        (loop, "distinct"): tm.wrap("pairs building", loop.distinct),
        (loop, "build_pairs"): tm.wrap("pairs building", loop.build_pairs),
        (loop, "behavior_logp_gap"): tm.wrap("behavior log-prob check", loop.behavior_logp_gap, block=True),
        (loop, "member_logp_gaps"): tm.wrap("behavior log-prob check", loop.member_logp_gaps, block=True),
        (loop._Outputs, "write"): tm.wrap("metrics writing", loop._Outputs.write),
        (st, "behavior_params"): tm.wrap("behavior merge", st.behavior_params, block=True),
        (st, "sync_behavior"): tm.wrap("behavior sync", st.sync_behavior, block=True),
        (ev, "generate"): tm.wrap("eval: generate", ev.generate),
    }
    make_train_step = loop.make_train_step

    def timed_make_train_step(*a, **k):
        return tm.wrap("train steps", make_train_step(*a, **k), block=True)

    class TimedCheckpointer(checkpoint.Checkpointer):
        save = tm.wrap("checkpointing", checkpoint.Checkpointer.save)
        close = tm.wrap("checkpointing", checkpoint.Checkpointer.close)

    patches[(loop, "make_train_step")] = timed_make_train_step
    patches[(loop, "Checkpointer")] = TimedCheckpointer
    originals = {key: getattr(*key) for key in patches}

    loop_tok = _Proxy(setup.tokenizer, tm, {"decode": "decoding to text"})
    loop_ann = _Proxy(task.annotator, tm, {"__call__": "annotation"})
    eval_tok = _Proxy(setup.tokenizer, tm, {"decode": "eval: decoding"})
    eval_ann = _Proxy(task.annotator, tm, {"__call__": "eval: scoring"})

    eval_kw = {"batch_size": cfg.eval_batch_size}  # as python -m bpo_jax train calls it

    def evaluate(params, step=None):
        t0 = time.perf_counter()
        inner = {k: tm.total(k) for k in ("eval: generate", "eval: decoding", "eval: scoring")}
        result = ev.score_test_set(params, mcfg, eval_tok, eval_ann, task.eval_prompts, task.eval_ids,
                                   task.eval_mask, task.references, max_new_tokens=cfg.eval_max_new_tokens,
                                   eos_token_ids=setup.eos_token_ids, mesh=setup.mesh, **eval_kw)
        wr = ev.win_rate_from_scores(result.scores, result.reference_scores)
        spent = time.perf_counter() - t0
        tm.add("eval: other", spent - sum(tm.total(k) - v for k, v in inner.items()))
        tm.add("evaluation", spent)
        return wr.metrics()

    for (mod, name), fn in patches.items():
        setattr(mod, name, fn)
    try:
        t0 = time.perf_counter()
        timed = dataclasses.replace(setup, tokenizer=loop_tok, task=dataclasses.replace(task, annotator=loop_ann))
        state = loop.train(cfg, timed, evaluate=evaluate if cfg.eval_every else None)
        loop_s = time.perf_counter() - t0
        in_loop_eval = tm.total("evaluation")
        state = st.sync_behavior(state)  # the next phase's start: π_β ← π_θ
        metrics = evaluate(st.policy_params(cfg, state), steps)
    finally:
        for (mod, name), fn in originals.items():
            setattr(mod, name, fn)
    inside = [r for r, _ in ROWS if r not in ("loop overhead", "behavior sync") and not r.startswith("eval")]
    tm.add("loop overhead", loop_s - sum(tm.total(r) for r in inside) - in_loop_eval)

    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    phase_s = loop_s + tm.total("behavior sync") + tm.total("evaluation") - in_loop_eval
    rows = {}
    for name, cat in ROWS:
        c = tm.calls.get(name, [])
        rows[name] = {"category": cat, "calls": len(c), "total_s": sum(c), "first_s": c[0] if c else None,
                      "rest_median_s": statistics.median(c[1:]) if len(c) > 1 else None}
    order = ("sampling", "decoding", "annotation", "training", "behavior sync", "checkpointing", "evaluation", "other")
    categories = {c: sum(r["total_s"] for r in rows.values() if r["category"] == c) for c in order}
    dev = jax.devices()[0]
    return {
        "device": f"{getattr(dev, 'device_kind', dev.platform)} x{jax.device_count()}", "jax": jax.__version__,
        "config": {k: getattr(cfg, k) for k in ("model", "batch_size", "max_new_tokens", "eval_size",
                                                "eval_max_new_tokens", "lora_rank", "ensemble_size", "reference",
                                                "param_dtype", "dtype", "max_prompt_length", "remat")},
        "steps": steps, "test_prompts": len(task.references), "setup_s": setup_s, "loop_s": loop_s,
        "phase_s": phase_s, "rows": rows, "categories": categories,
        "losses": [r["loss"] for r in records if "loss" in r],
        "phase_stats": {k: v for r in records for k, v in r.items() if k.startswith("phase/")},
        "eval": metrics, "run_dir": run_dir,
    }


def print_table(res: dict) -> None:
    c = res["config"]
    print(f"device: {res['device']}, jax {res['jax']}; {c['model']}, one phase of {res['steps']} steps x "
          f"{c['batch_size']} pairs, {c['max_new_tokens']} new tokens, "
          f"{'LoRA r=%d x%d' % (c['lora_rank'], c['ensemble_size']) if c['lora_rank'] else 'full fine-tuning'}, "
          f"reference={c['reference']}; eval {res['test_prompts']} test prompts x {c['eval_max_new_tokens']} tokens")
    print(f"setup (load model, tokenizer, task; not in the phase) {res['setup_s']:.1f} s")
    print(f"{'':26} {'calls':>5} {'total s':>8} {'first s':>8} {'median rest':>11} {'% phase':>7}")
    for name, r in res["rows"].items():
        if not r["calls"]:
            continue
        first = "-" if r["first_s"] is None else f"{r['first_s']:.2f}"
        rest = "-" if r["rest_median_s"] is None else f"{r['rest_median_s']:.3f}"
        print(f"{name:26} {r['calls']:5d} {r['total_s']:8.2f} {first:>8} {rest:>11} "
              f"{100 * r['total_s'] / res['phase_s']:6.1f}%")
    print(f"{'phase total':26} {'':5} {res['phase_s']:8.2f}   (the loop itself {res['loop_s']:.2f} s)")
    print("by category: " + ", ".join(f"{k} {v:.2f} s" for k, v in res["categories"].items()))
    loss = ", ".join(f"{v:.4f}" for v in res["losses"])
    print(f"losses: {loss}; eval win rate {100 * res['eval']['eval/win_rate']:.1f}%")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(REPO, "configs", "smollm2_cpu_demo.yaml"))
    p.add_argument("--steps", type=int, default=None, help="the phase length K (default: the config's T / F)")
    p.add_argument("--json", default=None, help="write the figures to this file")
    p.add_argument("--keep-run-dir", action="store_true", help="keep the temporary run_dir (default: deleted)")
    p.add_argument("overrides", nargs="*", help="config key=value, e.g. batch_size=4 eval_size=8")
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be >= 1")
    res = run(args)
    if not args.keep_run_dir:
        import shutil

        shutil.rmtree(res["run_dir"], ignore_errors=True)
    print_table(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, ensure_ascii=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
