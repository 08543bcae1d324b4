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
  behavior log-prob check  ``loop.behavior_logp_gap`` (the sampler's re-score at phase 1 and every
                       ``behavior_check_every`` phases; the π_θ-vs-π_β gaps come out of the train step); jitted,
                       compiles on its first call
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

``--peer trl`` (needs the test extras: torch, trl, accelerate, peft, datasets): on-policy online DPO on both sides,
one after the other, each in its own subprocess so that each peak RSS is its own:

    python bench/online_loop.py --peer trl [--steps 8] [--json out.json] [key=value ...]

The bpo_jax side (this script again, ``--side bpo_jax``) runs the config with ``total_steps = num_phases =
--steps`` (F = T: every step samples its own pairs with π_β = π_θ), ``reference=sft`` and no evaluation, under
the same proxies, and cuts the run into steps at the loop's metrics records: a step is the time from one
record to the next (the first from the loop's start), and each row's calls are charged to the step in which they
end; "other" is the rest of the step (``loop overhead`` above). Afterwards it writes the SFT weights as an HF
folder (``bpo_jax.models.save_pretrained``, float32: the very weights it started from) and the settings and each
step's prompts (with their gold summaries) for the TRL side, ``bench/trl_online.py``: TRL's ``OnlineDPOTrainer``
on those weights, prompts, sampling settings, LoRA, optimizer and the same ROUGE-L gold reward (its docstring
says how each is matched and how its parts are timed). Printed per side: seconds per step, the median of the
steps after the first two (compilation lands in those on our side), each part's median seconds per step, the
first step, peak RSS (``VmHWM``) over the whole process and from the end of the warm-up on, the losses; then the
ratios and what could not be matched. The config's data must be minisum-format (the reward needs its gold
summaries), ``ensemble_size`` 1 and ``loss_type`` sigmoid.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict

import trl_online  # bench/, next to this script
from rss import MiB, peak_rss, peak_rss_reset

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")  # the checkout: its configs/
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Rows in the order the loop reaches them, and the brief's categories they add up to.
ROWS = (("behavior merge", "behavior sync"), ("unstack π_β", "sampling"), ("sampling", "sampling"),
        ("decoding to text", "decoding"), ("pairs building", "annotation"), ("annotation", "annotation"),
        ("behavior log-prob check", "training"), ("train steps", "training"), ("metrics writing", "other"),
        ("checkpointing", "checkpointing"), ("loop overhead", "other"), ("behavior sync", "behavior sync"),
        ("eval: generate", "evaluation"), ("eval: decoding", "evaluation"), ("eval: scoring", "evaluation"),
        ("eval: other", "evaluation"))
# --peer trl: the steps (T = F), the warm-up steps left out of the medians, the rows timed per step (the rest of
# a step is the loop's own work, "other") and the config keys both sides share.
PEER_STEPS, PEER_WARMUP = 8, 2
PEER_ROWS = ("behavior sync", "behavior merge", "unstack π_β", "sampling", "decoding to text", "pairs building",
             "annotation", "behavior log-prob check", "train steps", "metrics writing", "checkpointing")
PEER_KEYS = ("batch_size", "max_new_tokens", "max_prompt_length", "temperature", "top_k", "top_p", "lora_rank",
             "lora_alpha", "lora_targets", "learning_rate", "lr_schedule", "weight_decay", "adam_eps",
             "max_grad_norm", "beta", "loss_type", "remat", "seed", "tied_pairs")


class Timings:
    def __init__(self):
        self.calls: dict[str, list[float]] = defaultdict(list)
        self.events: list[tuple[float, str, float]] = []

    def add(self, name: str, seconds: float) -> None:
        self.calls[name].append(seconds)
        self.events.append((time.perf_counter(), name, seconds))  # when each call ended: --peer trl's steps

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


def _load(args, **replace):
    """The config (``args.config`` ← ``args.overrides`` ← ``replace``) and the run ``python -m bpo_jax train``
    would set up from it (``tasks.setup_run``), timed: ``(cfg, setup, setup_s)``."""
    import jax

    from bpo_jax.config import ConfigError, load_config, validate_for_model, validate_for_processes
    from bpo_jax.runtime import distributed
    from bpo_jax.wiring.tasks import setup_run

    try:
        cfg = load_config(args.config, args.overrides)
        cfg = cfg.replace(**{k: v(cfg) if callable(v) else v for k, v in replace.items()})
        validate_for_processes(cfg, distributed.process_count(), jax.device_count())
    except (ConfigError, ValueError) as err:
        sys.exit(f"config error: {err}")
    t0 = time.perf_counter()
    setup = setup_run(cfg)
    mcfg = setup.model.config
    try:
        validate_for_model(cfg, mcfg.vocab_size, mcfg.max_position_embeddings)
    except ValueError as err:
        sys.exit(f"config error: {err}")
    return cfg, setup, time.perf_counter() - t0


def _patches(tm: Timings) -> dict:
    """``{(module or class, name): timing proxy}`` for the names the loop looks up at call time (the docstring's
    rows inside the loop, and the evaluation's generate)."""
    from bpo_jax.eval import win_rate as ev
    from bpo_jax.train import checkpoint, loop
    from bpo_jax.train import state as st

    patches = {
        (loop, "generate"): tm.wrap("sampling", loop.generate),
        (loop, "unstack_layers"): tm.wrap("unstack π_β", loop.unstack_layers, block=True),
        (loop, "distinct"): tm.wrap("pairs building", loop.distinct),
        (loop, "build_pairs"): tm.wrap("pairs building", loop.build_pairs),
        (loop._Outputs, "write"): tm.wrap("metrics writing", loop._Outputs.write),
        (st, "behavior_params"): tm.wrap("behavior merge", st.behavior_params, block=True),
        (st, "sync_behavior"): tm.wrap("behavior sync", st.sync_behavior, block=True),
        (ev, "generate"): tm.wrap("eval: generate", ev.generate),
    }
    patches[(loop, "behavior_logp_gap")] = tm.wrap("behavior log-prob check", loop.behavior_logp_gap, block=True)
    make_train_step = loop.make_train_step

    def timed_make_train_step(*a, **k):
        return tm.wrap("train steps", make_train_step(*a, **k), block=True)

    class TimedCheckpointer(checkpoint.Checkpointer):
        save = tm.wrap("checkpointing", checkpoint.Checkpointer.save)
        close = tm.wrap("checkpointing", checkpoint.Checkpointer.close)

    patches[(loop, "make_train_step")] = timed_make_train_step
    patches[(loop, "Checkpointer")] = TimedCheckpointer
    return patches


@contextlib.contextmanager
def _patched(patches: dict):
    originals = {key: getattr(*key) for key in patches}
    for (mod, name), fn in patches.items():
        setattr(mod, name, fn)
    try:
        yield
    finally:
        for (mod, name), fn in originals.items():
            setattr(mod, name, fn)


def run(args) -> dict:
    import jax

    from bpo_jax.eval import win_rate as ev
    from bpo_jax.train import loop
    from bpo_jax.train import state as st

    cfg, setup, setup_s = _load(args, total_steps=lambda c: args.steps or c.steps_per_phase, num_phases=1,
                                run_dir=tempfile.mkdtemp(prefix="bpo_bench_online_"))
    steps, run_dir, mcfg, task = cfg.total_steps, cfg.run_dir, setup.model.config, setup.task
    tm = Timings()
    patches = _patches(tm)

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

    with _patched(patches):
        t0 = time.perf_counter()
        timed = dataclasses.replace(setup, tokenizer=loop_tok, task=dataclasses.replace(task, annotator=loop_ann))
        state = loop.train(cfg, timed, evaluate=evaluate if cfg.eval_every else None)
        loop_s = time.perf_counter() - t0
        in_loop_eval = tm.total("evaluation")
        state = st.sync_behavior(cfg, state, mcfg.dtype)  # the next phase's start: π_β ← π_θ
        metrics = evaluate(st.policy_params(cfg, state), steps)
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


# ---------------------------------------------------------------------------------------- --peer trl


def run_on_policy(args) -> dict:
    """``--peer trl``'s bpo_jax side, in its own process (``--side bpo_jax``): the loop for T = F = ``--steps``
    steps with ``reference=sft`` and no evaluation, timed step by step; then the SFT weights
    (``bpo_jax.models.save_pretrained``, after the measurement) and ``spec.json`` for the TRL side."""
    import jax

    from bpo_jax.models import save_pretrained
    from bpo_jax.train import loop

    steps = args.steps or PEER_STEPS
    warm = min(PEER_WARMUP, steps - 1)
    cfg, setup, setup_s = _load(args, total_steps=steps, num_phases=steps, reference="sft", eval_every=0,
                                run_dir=os.path.join(args.exchange, "run"))
    gold = getattr(setup.task.annotator, "gold", None)
    problem = ("the ROUGE-L gold reward (minisum-format data)" if gold is None else
               "ensemble_size=1 (TRL trains one model)" if cfg.ensemble_size != 1 else
               f"loss_type in {trl_online.LOSSES}" if cfg.loss_type not in trl_online.LOSSES else None)
    if problem:
        sys.exit(f"--peer trl needs {problem}")
    tm = Timings()
    patches = _patches(tm)
    marks, prompts, lengths, rss = [], defaultdict(list), [], {}
    write, generate, stream = patches[(loop._Outputs, "write")], patches[(loop, "generate")], setup.task.train

    def marking_write(self, record):  # the loop writes one record per step: the step boundaries
        write(self, record)
        marks.append(time.perf_counter())
        if len(marks) - 1 == warm:
            rss["until_warm"], rss["reset"] = peak_rss(), peak_rss_reset()

    def counting_generate(*a, **k):
        out = generate(*a, **k)
        lengths.append(out.mask.sum(1).tolist())
        return out

    def recording_next_batch():  # the prompts of each step, for the TRL side
        batch = stream.next_batch()
        prompts[len(marks) - 1].extend(batch.prompts)
        return batch

    patches[(loop._Outputs, "write")], patches[(loop, "generate")] = marking_write, counting_generate
    recorded = _Proxy(stream, tm, {})
    recorded._timed["next_batch"] = recording_next_batch
    task = dataclasses.replace(setup.task, train=recorded, annotator=_Proxy(setup.task.annotator, tm,
                                                                            {"__call__": "annotation"}))
    timed = dataclasses.replace(setup, tokenizer=_Proxy(setup.tokenizer, tm, {"decode": "decoding to text"}),
                                task=task)
    with _patched(patches):
        marks.append(time.perf_counter())
        loop.train(cfg, timed)
        loop_s = time.perf_counter() - marks[0]
    end_peak = peak_rss()
    res = trl_online.per_step(tm.events, marks, PEER_ROWS, warm)
    with open(os.path.join(cfg.run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    save_pretrained(setup.model, setup.tokenizer, os.path.join(args.exchange, "model"))  # float32 SFT weights
    spec = {k: getattr(cfg, k) for k in PEER_KEYS} | {
        "steps": steps, "warmup": warm,
        "prompts_by_step": [[{"text": p, "gold": gold[p]} for p in prompts[i]] for i in range(steps)]}
    with open(os.path.join(args.exchange, "spec.json"), "w") as f:
        json.dump(spec, f)
    whole = [v for v in (rss.get("until_warm"), end_peak) if v is not None]
    dev = jax.devices()[0]
    stat = lambda k: sum(r.get(f"phase/{k}", 0) for r in records)  # noqa: E731
    return {**res, "device": f"{getattr(dev, 'device_kind', dev.platform)} x{jax.device_count()}",
            "jax": jax.__version__, "config": {k: getattr(cfg, k) for k in PEER_KEYS + ("model", "sampling_layout")
                                                if hasattr(cfg, k)},
            "setup_s": setup_s, "loop_s": loop_s, "first_step_s": res["step_times_s"][0],
            "peak_rss_mib": max(whole) / MiB if whole else None,
            "peak_rss_after_warmup_mib": end_peak / MiB if rss.get("reset") and end_peak else None,
            "losses": [r["loss"] for r in records if "loss" in r], "response_tokens": lengths,
            "prompts_sampled": stat("prompts_sampled"), "identical_pairs_dropped": stat("identical_pairs_dropped"),
            "tied_pairs_dropped": stat("tied_pairs_dropped")}


def run_peer(args) -> dict:
    """Both sides of ``--peer trl``, one after the other, each in its own subprocess."""
    import importlib.util
    import subprocess

    missing = [m for m in ("torch", "trl", "accelerate", "peft", "datasets") if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"--peer trl needs {', '.join(missing)} (pip install -r requirements-test.txt); not installed")
    exchange = tempfile.mkdtemp(prefix="bpo_bench_online_trl_")
    cmd = [sys.executable, os.path.abspath(__file__), "--side", "bpo_jax", "--exchange", exchange,
           "--config", args.config, "--steps", str(args.steps or PEER_STEPS), *args.overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
        sys.exit(f"the bpo_jax side failed (exit {proc.returncode})")
    with open(os.path.join(exchange, "bpo_jax.json")) as f:
        ours = json.load(f)
    peer = trl_online.run(exchange)
    ratio = lambda k: ours[k] / peer[k] if ours.get(k) and peer.get(k) else None  # noqa: E731
    return {"bpo_jax": ours, "trl": peer, "exchange": exchange,
            "ratio": {"step_time": ratio("step_s"), "peak_rss": ratio("peak_rss_mib")},
            "not_matched": not_matched(ours, peer)}


def not_matched(ours: dict, peer: dict) -> list[str]:
    """What differs between the two runs: this run's counts, then what always differs (``NOT_MATCHED``)."""
    c, n = ours["config"], len(ours["step_times_s"])

    def tokens(side):
        calls = side["response_tokens"]
        return (f"{statistics.mean(t for call in calls for t in call):.1f} tokens on average, the longest "
                f"{statistics.median(max(call) for call in calls):.0f} (median over steps)") if calls else "-"

    out = [] if peer["same_prompts"] else ["the prompts: TRL's steps did not get bpo_jax's prompts in bpo_jax's order"]
    out += [f"the responses: each side draws its own (JAX and torch RNGs); bpo_jax {tokens(ours)}, TRL "
           f"{tokens(peer)}; each sampling call decodes until its longest response ends, so step times follow "
           f"these lengths"]
    extra = ours["prompts_sampled"] - n * c["batch_size"]
    out.append(f"pairs: bpo_jax dropped {ours['identical_pairs_dropped']} identical and "
               f"{ours['tied_pairs_dropped']} tied pairs and sampled {extra} more prompts for them "
               f"(identical_pairs=resample, tied_pairs={c.get('tied_pairs', 'drop')}); TRL trains on every pair, "
               f"a tie labelled first-as-chosen")
    if c["remat"] != "none":
        out.append(f"rematerialisation: bpo_jax remat={c['remat']}; TRL gradient checkpointing (HF recomputes each "
                   f"whole layer), under which TRL generates with its KV cache only because generation_kwargs sets "
                   f"use_cache (its default turns the cache off then)")
    if c["lora_rank"]:
        out.append("LoRA: the same targets, r, alpha and B = 0 (both start at the SFT policy); A from the same "
                   "distribution (PEFT's kaiming-uniform) but other random draws")
    return out + list(trl_online.NOT_MATCHED)


def print_peer_table(res: dict) -> None:
    ours, peer = res["bpo_jax"], res["trl"]
    c, n = ours["config"], len(ours["step_times_s"])
    lora = (f"LoRA r={c['lora_rank']} alpha={c['lora_alpha']:g} on {','.join(c['lora_targets'])}"
            if c["lora_rank"] else "full fine-tuning")
    print(f"on-policy online DPO (F = T = {n}), reference=sft: {c['model']}, {c['batch_size']} prompts x 2 samples "
          f"x {c['max_new_tokens']} new tokens at temperature {c['temperature']:g}, {lora}, AdamW lr "
          f"{c['learning_rate']:g} ({c['lr_schedule']} to 0), {c['loss_type']} beta {c['beta']:g}, ROUGE-L gold reward")
    print(f"bpo_jax: {ours['device']}, jax {ours['jax']}; trl: {peer['device']}, optim {peer['optim']}")
    first = ours["median_from_step"]
    print(f"{'':8} {f's/step (median {first}..{n})':>24} {'first step s':>12} {'peak RSS MiB':>12} "
          f"{'after warm-up':>13} {'last loss':>9}")
    for name, r in (("bpo_jax", ours), ("trl", peer)):
        loss = f"{r['losses'][-1]:.4f}" if r["losses"] else "-"
        print(f"{name:8} {r['step_s']:24.2f} {r['first_step_s']:12.2f} {_mib(r['peak_rss_mib']):>12} "
              f"{_mib(r['peak_rss_after_warmup_mib']):>13} {loss:>9}")
    for name, r in (("bpo_jax", ours), ("trl", peer)):
        parts = ", ".join(f"{k} {v:.2f}" for k, v in r["parts_s"].items() if v or k == "other")
        print(f"{name} parts (s, median per step): {parts}")
    ratio = res["ratio"]
    print(f"bpo_jax / trl: s/step {ratio['step_time']:.2f}x"
          + (f", peak RSS {ratio['peak_rss']:.2f}x" if ratio["peak_rss"] else ""))
    print("not matched:")
    for line in res["not_matched"]:
        print(f"  - {line}")


def _mib(v):
    return "-" if v is None else f"{v:.0f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(REPO, "configs", "smollm2_cpu_demo.yaml"))
    p.add_argument("--steps", type=int, default=None, help="the phase length K (default: the config's T / F); "
                   f"with --peer trl the run's steps T = F (default {PEER_STEPS})")
    p.add_argument("--peer", choices=("trl",), default=None,
                   help="on-policy online DPO against TRL's OnlineDPOTrainer, each side in its own process")
    p.add_argument("--side", choices=("bpo_jax",), default=None, help=argparse.SUPPRESS)  # --peer trl's child
    p.add_argument("--exchange", default=None, help=argparse.SUPPRESS)  # the child's folder for the TRL side
    p.add_argument("--json", default=None, help="write the figures to this file")
    p.add_argument("--keep-run-dir", action="store_true",
                   help="keep the temporary run_dir (--peer trl: the folder with both sides' files; default: deleted)")
    p.add_argument("overrides", nargs="*", help="config key=value, e.g. batch_size=4 eval_size=8")
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be >= 1")
    if args.side:
        res = run_on_policy(args)
        with open(os.path.join(args.exchange, "bpo_jax.json"), "w") as f:
            json.dump(res, f, ensure_ascii=False)
        return 0
    import shutil

    if args.peer:
        res = run_peer(args)
        if not args.keep_run_dir:
            shutil.rmtree(res["exchange"], ignore_errors=True)
        print_peer_table(res)
    else:
        res = run(args)
        if not args.keep_run_dir:
            shutil.rmtree(res["run_dir"], ignore_errors=True)
        print_table(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, ensure_ascii=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
