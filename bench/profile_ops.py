"""Where a jitted program's time goes, op by op, from a ``jax.profiler`` trace.

    python bench/profile_ops.py TRACE_DIR [--top 25]

``TRACE_DIR`` is what ``jax.profiler.trace(TRACE_DIR, create_perfetto_trace=True)`` wrote (``bench/train_step.py
--profile DIR`` writes one around a single step). Every complete event of the perfetto trace is an XLA op
(a fusion, a dot, a copy, ...) or a Python/runtime span; the runtime's own spans (thunk executor, thread-pool
waits, Python frames) are left out, and the ops' durations are summed by name and by kind (the name without
its ``.N`` suffix: ``ynn_fusion`` = XNNPACK/YNNPACK matmul fusions on CPU, ``copy_bitcast_fusion`` = layout
copies fused with elementwise work, ...). On a multi-threaded backend ops overlap, so the sum can exceed the
wall time. Map an op name back to its HLO with the compiled program's text (``jitted.lower(...).compile()
.as_text()``), which also names the source line in each op's metadata.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re

_RUNTIME = ("ThunkExecutor", "SlinkyThreadPool", "$", "PjitFunction", "CommonPjRtLoadedExecutable")


def op_times(trace_dir: str) -> tuple[collections.Counter, collections.Counter]:
    """``(microseconds by op name, calls by op name)`` from the newest perfetto trace under ``trace_dir``."""
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir} (trace with create_perfetto_trace=True)")
    with gzip.open(files[-1]) as f:
        events = json.load(f)["traceEvents"]
    total, calls = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e and not e.get("name", "").startswith(_RUNTIME):
            total[e["name"]] += e["dur"]
            calls[e["name"]] += 1
    return total, calls


def summary(trace_dir: str, top: int = 25) -> str:
    """A text table: the op kinds' share of all op time, then the ``top`` ops by time."""
    total, calls = op_times(trace_dir)
    kinds = collections.Counter()
    for name, us in total.items():
        kinds[re.sub(r"\.\d+$", "", name)] += us
    all_us = sum(total.values()) or 1
    lines = [f"op time {all_us / 1e6:.2f} s (ops on parallel threads overlap); by op kind:"]
    lines += [f"  {us / 1e3:10.1f} ms {100 * us / all_us:5.1f}%  {kind}" for kind, us in kinds.most_common(top)]
    lines.append(f"top {top} ops:              calls")
    lines += [f"  {us / 1e3:10.1f} ms {calls[name]:6d}  {name}" for name, us in total.most_common(top)]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace_dir")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    print(summary(args.trace_dir, args.top))


if __name__ == "__main__":
    main()
