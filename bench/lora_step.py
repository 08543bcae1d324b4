"""Time and memory of the jitted LoRA train step on SmolLM2-135M shapes (random weights of the same shapes).

    python bench/lora_step.py [--rank 16] [--ensemble 1] [--pairs 4] [--prompt-len 64] [--new 32] \
        [--param-dtype float32] [--dtype float32] [--repeats 3]

Builds the state with ``state.create_state`` and jits ``train_step.train_step`` (state donated, as
``make_train_step`` does; ``reference=sft`` so a reference forward runs too) and reports: XLA's compiled
``memory_analysis()`` (temporary buffers, and arguments + outputs − aliased), the process's peak RSS while the
step runs (``VmHWM`` after resetting it through ``/proc/self/clear_refs``, Linux), and the median wall time of
a step. It uses only APIs that exist before and after the activation-space LoRA change, so a copy of this
file in another checkout's ``bench/`` measures that checkout.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bpo_jax import state as st  # noqa: E402
from bpo_jax import train_step as ts  # noqa: E402
from bpo_jax.config import TrainConfig  # noqa: E402
from bpo_jax.models import init_params, load_pretrained  # noqa: E402

MiB = 2**20


def _peak_rss_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--ensemble", type=int, default=1)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    mc = load_pretrained(args.model)[0].config.replace(param_dtype=args.param_dtype, dtype=args.dtype)
    gc.collect()
    cfg = TrainConfig(total_steps=100, num_phases=1, batch_size=args.pairs, max_new_tokens=args.new,
                      lora_rank=args.rank, lora_alpha=args.alpha, ensemble_size=args.ensemble, reference="sft",
                      param_dtype=args.param_dtype, dtype=args.dtype)
    base = init_params(mc, jax.random.key(0))
    state = st.create_state(cfg, base, jax.random.key(1))
    rng = np.random.default_rng(0)
    t = args.prompt_len + args.new
    ids = lambda: jnp.asarray(rng.integers(3, mc.vocab_size, (args.pairs, t)), jnp.int32)  # noqa: E731
    ones, zeros = jnp.ones((args.pairs, t), jnp.int32), jnp.zeros((args.pairs,), jnp.float32)
    batch = dict(zip(ts.BATCH_KEYS, (ids(), ones, ids(), ones, zeros, zeros, zeros)))

    def fn(rest, base, batch):
        new, metrics = ts.train_step(cfg, mc, rest.replace(base=base), batch, prompt_len=args.prompt_len)
        return new.replace(base=None), metrics

    step = jax.jit(fn, donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = step.lower(state.replace(base=None), base, batch).compile()
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    rest = state.replace(base=None)
    del state
    gc.collect()
    rss_ok = _peak_rss_reset()
    rss0 = _peak_rss()
    rest, m = compiled(rest, base, batch)  # warm-up
    jax.block_until_ready(m)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        rest, m = compiled(rest, base, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    trainable = jax.tree.leaves(rest.trainable)[0].dtype
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; {args.model} shapes, "
          f"param_dtype={args.param_dtype} dtype={args.dtype}, trainable {trainable}; LoRA r={args.rank} "
          f"x{args.ensemble} on {','.join(cfg.lora_targets)}; {args.pairs} pairs x {t} tokens, reference=sft")
    if ma is not None:
        args_out = ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
        print(f"compiled temp {ma.temp_size_in_bytes / MiB:.1f} MiB; arguments+outputs-aliased "
              f"{args_out / MiB:.1f} MiB")
    if rss_ok:
        print(f"peak RSS during the steps {_peak_rss() / MiB:.0f} MiB (RSS before them {rss0 / MiB:.0f} MiB)")
    print(f"step: median {statistics.median(times):.2f} s of {args.repeats} (compile {compile_s:.1f} s); "
          f"loss {float(m['loss']):.4f}")


if __name__ == "__main__":
    main()
