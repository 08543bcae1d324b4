"""XLA:CPU runtime settings (``XLA_FLAGS``) against bpo_jax's CPU workloads, each variant in a fresh process.

    python bench/xla_cpu.py [--workloads matmul decode step membw] [--variants eigen vec512 ...|NAME='--xla_...']
        [--small] [--rounds 2] [--repeats 3] [--pause-grid] [--json out.json]

``XLA_FLAGS`` is read once, when jax builds its CPU backend, so each (variant, workload) runs in a subprocess
(``--child``) with ``XLA_FLAGS`` = the caller's + the variant's (``dtype:bfloat16`` in a variant is not a flag but
bpo_jax's compute dtype). Every variant run follows a fresh baseline run (baseline, A, baseline, B, ...).
Workloads, timed after one warm-up call (median of ``--repeats``, ``jax.block_until_ready``):
  * ``matmul``: f32 2048x576 @ 576x1536, and with bf16 inputs + f32 accumulation (``preferred_element_type``);
    GFLOP/s, max relative error vs float64 NumPy, and the dot path in the optimized HLO (ynn/xnn/onednn fusion, dot).
  * ``step``: ``bench/train_step.py``'s DPO step at its defaults (8 pairs, 128+128 tokens, SmolLM2-135M float32,
    SFT reference; ``--small``: 2 pairs, 64+64); s/step, and loss / grad_norm / logps of the first step.
  * ``decode``: ``sampler.generate`` as ``bench/sampling.py`` runs it: batch 16, prompt 64, 64 new tokens
    (``--small``: 32) incl. prefill; tokens/s, and the fraction of sampled tokens equal to the baseline's.
  * ``membw``: NumPy copy of 256 MiB, (read + written bytes) / s.
Each run also reports cpu = process CPU s / wall s (2.0 = both cores of this 2-core VM) and the busy threads; the
table adds the figure per busy core (rate / cpu, s x cpu), which stays comparable when other work takes a core.
``--pause-grid``: SIGSTOP the processes matching ``--grid-pattern`` during each run, SIGCONT after (also on error).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import time

log = logging.getLogger("xla_cpu")
NO_YNN = "--xla_cpu_experimental_ynn_fusion_type=-individual_dot"
VARIANTS = {  # name -> flags appended to XLA_FLAGS
    "baseline": "",
    "eigen": NO_YNN,  # dots back on XLA's Eigen matmul instead of the default YNNPACK
    "onednn": f"{NO_YNN} --xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot",
    "ynn_fused": "--xla_cpu_experimental_ynn_fusion_type=individual_dot,dot,eltwise,reduce",
    "vec512": "--xla_cpu_prefer_vector_width=512",
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "eigen_1thread": "--xla_cpu_multi_thread_eigen=false",
    "devices8": "--xla_force_host_platform_device_count=8",
    "bf16": "dtype:bfloat16",  # not a flag: bpo_jax's compute dtype (float32 weights) for step and decode
}
BENCH = os.path.dirname(os.path.abspath(__file__))


def _thread_cpu():
    """{thread id: CPU seconds} of this process's threads (Linux /proc; utime + stime)."""
    out = {}
    for t in os.listdir("/proc/self/task"):
        try:  # a thread may end between the listing and the read
            f = open(f"/proc/self/task/{t}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[t] = (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    return out


def _timed(fn, repeats):
    """(median wall s, median CPU s / wall s, threads that did >= 10% of the process's CPU time)."""
    fn()  # warm-up (compiles)
    times, cpu = [], []
    th0 = _thread_cpu()
    for _ in range(repeats):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        fn()
        wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        times.append(wall)
        cpu.append((r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / wall)
    th1 = _thread_cpu()
    used = [v - th0.get(t, 0.0) for t, v in th1.items()]
    busy = sum(u >= 0.1 * sum(used) for u in used)
    return statistics.median(times), statistics.median(cpu), busy


def _dot_paths(jitted, *args):
    text = jitted.lower(*args).compile().as_text()
    found = re.findall(r"%(ynn_fusion|xnn_fusion|onednn_fusion)[.\d]* = |= \S+ dot\(", text)
    paths = {k: found.count(k) for k in set(found) if k}
    paths["dot"] = found.count("") - sum(paths.values())  # dots outside those library fusions (XLA's own)
    return paths


def child(workload: str, small: bool, repeats: int, dtype: str = "float32") -> dict:
    if workload == "membw":
        import numpy as np

        a = np.ones(64 << 20, np.float32)
        b = np.empty_like(a)
        s, cpu, busy = _timed(lambda: np.copyto(b, a), max(5, repeats))
        return {"gb_s": 2 * a.nbytes / s / 1e9, "s": s, "cpu": cpu, "busy_threads": busy}
    import jax
    import jax.numpy as jnp
    import numpy as np

    out = {"devices": jax.device_count()}
    if workload == "matmul":
        m, k, n = 2048, 576, 1536
        rng = np.random.default_rng(0)
        a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
        ref = a.astype(np.float64) @ b.astype(np.float64)
        for name, dt in (("f32", jnp.float32), ("bf16", jnp.bfloat16)):
            f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
            x, y = jnp.asarray(a, dt), jnp.asarray(b, dt)
            s, cpu, busy = _timed(lambda: f(x, y).block_until_ready(), max(10, repeats))
            err = float(np.max(np.abs(np.asarray(f(x, y)) - ref)) / np.max(np.abs(ref)))
            out[name] = {"s": s, "gflops": 2 * m * k * n / s / 1e9, "cpu": cpu, "busy_threads": busy, "rel_err": err,
                         "paths": _dot_paths(f, x, y)}
        return out
    sys.path.insert(0, BENCH)
    from bpo_jax.models import load_pretrained

    if workload == "decode":
        from bpo_jax.sample.sampler import Decoding, generate

        model, _ = load_pretrained("smollm2-135m-instruct", dtype=dtype)
        batch, plen, new = 16, 64, 32 if small else 64
        ids = np.random.default_rng(0).integers(100, model.config.vocab_size - 100, (batch, plen)).astype(np.int32)
        dec = Decoding(max_new_tokens=new, temperature=1.0)
        run = lambda: jax.block_until_ready(generate(model, ids, np.ones_like(ids), dec,  # noqa: E731
                                                     rng=jax.random.key(0)).tokens)
        s, cpu, busy = _timed(run, repeats)
        out.update(s=s, tokens_per_s=batch * new / s, cpu=cpu, busy_threads=busy,
                   tokens=np.asarray(run()).ravel().tolist(),
                   weight_bytes=sum(x.nbytes for x in jax.tree.leaves(model.params)))
        return out
    # step: bench/train_step.py's defaults and batch, built as its run_bpo_jax builds them (metrics kept)
    import train_step

    from bpo_jax import config as config_module
    from bpo_jax.config import TrainConfig
    from bpo_jax.train import state as st
    from bpo_jax.train import step as ts

    a = train_step.parse_args(["--pairs", "2", "--prompt-len", "64", "--response-len", "64"] if small else [])
    keys = getattr(config_module, "KEY_GROUP", None) or TrainConfig.__dataclass_fields__
    extra = {"share_prompt": a.share_prompt == "on"} if "share_prompt" in keys else {}
    cfg = TrainConfig(model=a.model, total_steps=1000, num_phases=1, batch_size=a.pairs, micro_batches=1,
                      max_new_tokens=a.response_len, lora_rank=a.lora_rank, ensemble_size=a.ensemble,
                      reference=a.reference, loss_type=a.loss_type, param_dtype="float32", dtype=dtype,
                      remat=a.remat, attention=a.attention, **extra)
    model, _ = load_pretrained(a.model, param_dtype="float32", dtype=dtype, remat=a.remat)
    mc = model.config
    eos = mc.eos_token_id[0] if isinstance(mc.eos_token_id, tuple) else mc.eos_token_id
    nb = train_step.make_batch(mc.vocab_size, eos if eos is not None else 2, mc.pad_token_id or 0, pairs=a.pairs,
                               prompt_len=a.prompt_len, response_len=a.response_len)
    batch = {k: jnp.asarray(v) for k, v in nb.items()}
    state0 = st.create_state(cfg, model.params, jax.random.key(1), compute_dtype=mc.dtype)
    step = ts.make_train_step(cfg, mc, st.shardings(state0), prompt_len=a.prompt_len)
    holder = {"state": state0}
    _, m = step(jax.tree.map(jnp.copy, state0), batch)  # first step from the fresh state: the numerics check
    out["metrics"] = {k: float(v) for k, v in m.items() if np.ndim(v) == 0}

    def run():
        holder["state"], mm = step(holder["state"], batch)
        jax.block_until_ready(mm)

    s, cpu, busy = _timed(run, repeats)
    out.update(s=s, cpu=cpu, busy_threads=busy, pairs=a.pairs, tokens=a.pairs * 2 * (a.prompt_len + a.response_len))
    return out


class Grid:
    """SIGSTOP/SIGCONT of the background grid around each measurement, with a budget on total paused time."""

    def __init__(self, pattern, enabled, max_paused):
        self.pattern, self.enabled, self.max_paused, self.paused_s, self.pids = pattern, enabled, max_paused, 0.0, []

    def __enter__(self):
        if self.enabled and self.paused_s >= self.max_paused:
            log.warning("paused %.0f s already (--max-paused): this run leaves the grid running", self.paused_s)
        elif self.enabled:
            r = subprocess.run(["pgrep", "-f", self.pattern], capture_output=True, text=True)
            self.pids = [int(p) for p in r.stdout.split() if int(p) != os.getpid()]
            for p in self.pids:
                os.kill(p, signal.SIGSTOP)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        for p in self.pids:
            subprocess.run(["kill", "-CONT", str(p)], check=False)
        if self.pids:
            self.paused_s += time.perf_counter() - self.t0
        self.pids = []


def run_child(name, flags, workload, args, grid):
    dtype = next((f.split(":", 1)[1] for f in flags.split() if f.startswith("dtype:")), "float32")
    flags = " ".join(f for f in flags.split() if not f.startswith("dtype:"))
    env = dict(os.environ, XLA_FLAGS=" ".join(x for x in (os.environ.get("XLA_FLAGS", ""), flags) if x),
               HF_HUB_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="2")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", workload, "--repeats", str(args.repeats),
           "--dtype", dtype]
    cmd += ["--small"] if args.small else []
    with grid:
        time.sleep(1.0 if grid.pids else 0.0)  # let the stopped processes leave the run queue
        load, paused = open("/proc/loadavg").read().split()[0], bool(grid.pids)
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.child_timeout)
        except subprocess.TimeoutExpired:
            log.error("%s/%s: timed out after %ss", name, workload, args.child_timeout)
            return None
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode or not lines:
        log.error("%s/%s failed (rc %s): %s", name, workload, r.returncode, r.stderr[-2000:])
        return None
    res = dict(json.loads(lines[-1][7:]), load=float(load), paused=paused)
    log.info("%s/%s: %s", name, workload, {k: v for k, v in res.items() if k != "tokens"})
    return res


def summarize(results, variants):
    """Per (workload, variant): median, spread (max-min)/median, ratio to the interleaved baselines, and the same
    per busy core (rate / cpu, or seconds x cpu: robust to other work taking a core), cpu and load of each run."""
    metric = {"matmul": [("f32", "gflops"), ("bf16", "gflops")], "step": [(None, "s")],
              "decode": [(None, "tokens_per_s")], "membw": [(None, "gb_s")]}
    rows = [f"{'workload':12s} {'variant':14s} {'median':>9s} {'spread':>7s} {'x base':>6s} {'/core':>8s} "
            f"{'x base':>6s}  cpu per run / load per run / numerics (first run vs baseline's first)"]
    for wl, runs in results.items():
        for sub, key in metric[wl]:
            one = lambda r: r[sub] if sub else r  # noqa: E731
            norm = lambda r: one(r)[key] * one(r)["cpu"] ** (1 if key == "s" else -1)  # noqa: E731
            stats = {n: (statistics.median(one(r)[key] for r in runs[n]), statistics.median(map(norm, runs[n])))
                     for n in variants if runs.get(n)}
            b = stats.get("baseline", (float("nan"),) * 2)
            for name, (med, nmed) in stats.items():
                vals, r0, base0 = [one(r)[key] for r in runs[name]], runs[name][0], (runs.get("baseline") or [{}])[0]
                note = ""
                if wl == "step" and base0:
                    note = " ".join(f"d{k}={abs(r0['metrics'][k] - base0['metrics'][k]):.1e}"
                                    for k in ("loss", "grad_norm", "logps/chosen"))
                elif wl == "decode" and base0:
                    note = f"same_tokens={statistics.mean(x == y for x, y in zip(r0['tokens'], base0['tokens'])):.3f}"
                elif wl == "matmul":
                    note = f"rel_err={r0[sub]['rel_err']:.1e} {r0[sub]['paths']}"
                rows.append(f"{wl + ('/' + sub if sub else ''):12s} {name:14s} {med:9.3f} "
                            f"{(max(vals) - min(vals)) / med:7.1%} {med / b[0]:6.3f} {nmed:8.3f} {nmed / b[1]:6.3f}  "
                            f"{','.join(format(one(r)['cpu'], '.2f') for r in runs[name])} / "
                            f"{','.join(str(r['load']) for r in runs[name])} / {note}")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", nargs="+", default=["matmul", "decode", "step"],
                   choices=("matmul", "decode", "step", "membw"))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS),
                   help=f"built-in names ({', '.join(VARIANTS)}) or NAME='--xla_flag=... ...'")
    p.add_argument("--small", action="store_true", help="smaller step (2 pairs, 64+64) and decode (32 new)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pause-grid", action="store_true")
    p.add_argument("--grid-pattern", default="bpo_jax (sft|experiment|train)")
    p.add_argument("--child-timeout", type=float, default=540.0)
    p.add_argument("--max-paused", type=float, default=2400.0)
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.small, args.repeats, args.dtype)), flush=True)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    variants = dict(v.split("=", 1) if "=" in v and v.split("=", 1)[0] not in VARIANTS else (v, VARIANTS[v])
                    for v in args.variants)
    variants.pop("baseline", None)
    grid = Grid(args.grid_pattern, args.pause_grid, args.max_paused)
    results = {wl: {} for wl in args.workloads}
    for rnd in range(args.rounds):
        for name, flags in variants.items() or [("baseline", "")]:
            for wl in args.workloads:
                pairs = (("baseline", ""), (name, flags)) if name != "baseline" else (("baseline", ""),)
                for vname, vflags in pairs:  # A/B: a fresh baseline run before each variant run
                    res = run_child(vname, vflags, wl, args, grid)
                    if res:
                        results[wl].setdefault(vname, []).append(res)
    log.info("paused the grid for %.0f s in all", grid.paused_s)
    table = summarize(results, ["baseline", *variants])
    log.info("XLA_FLAGS per variant: %s\n%s", variants, table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"variants": variants, "results": results}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
