"""One phase's collection of pairs with π_β in the training layout and in the sampling layout, on one mesh.

    python bench/sampling_layout.py [--devices 8] [--repeats 2] [--json out.json] [key=value ...]
        default: --config configs/smollm2_cpu_demo.yaml mesh_data=1 mesh_fsdp=-1 (the paper configs' mesh)

How: the run is set up as ``python -m bpo_jax train`` sets it up (``tasks.setup_run``: the model loaded in the
training layout on the mesh, its tokenizer, prompt stream and annotator); then ``loop.collect_pairs`` itself runs
one phase's collection (K·B pairs: sampling, decoding, annotation) with ``sampling_layout=train`` and with
``sampling_layout=replicated`` (the weights moved into the sampling layout once, inside the call), the prompt
stream rewound before each call so both layouts sample the same prompts with the same key. π_β is the loaded
model's weights (a phase-1 π_β without adapters). Per layout: the first call (compilation included) and the
median of ``--repeats`` more; and how many pairs both layouts sampled token for token alike (the layouts sum
the matmuls in different orders, so a rare near-tied draw may differ and its pair with it). ``--devices``: fake
CPU devices when the platform is the CPU (set before JAX starts).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/smollm2_cpu_demo.yaml")
    ap.add_argument("--devices", type=int, default=8, help="fake CPU devices (CPU platform only)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    return ap.parse_args(argv)


def _timed_collection(collect, cfg, run, params, key, repeats: int) -> dict:
    """First-call and median seconds of ``collect`` (the prompt stream rewound before each call) and the pairs."""
    start_state = run.task.train.get_state()
    times, pairs = [], None
    for _ in range(1 + repeats):
        run.task.train.set_state(start_state)
        t = time.perf_counter()
        pairs, _ = collect(cfg, run, params, key)
        times.append(time.perf_counter() - t)
    return {"first_s": times[0], "median_s": statistics.median(times[1:]) if repeats else None,
            "times_s": times, "pairs": pairs}


def main(argv=None) -> int:
    args = _parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
        os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} "
                                   f"--xla_force_host_platform_device_count={args.devices}").strip()
    import jax
    import numpy as np

    from bpo_jax.config import load_config
    from bpo_jax.train import loop
    from bpo_jax.wiring.tasks import setup_run

    cfg = load_config(args.config, ["mesh_data=1", "mesh_fsdp=-1", *args.overrides])
    run = setup_run(cfg)
    key = jax.random.key(cfg.seed)
    res = {"device": jax.devices()[0].device_kind, "devices": jax.device_count(), "mesh": dict(run.mesh.shape),
           "model": cfg.model, "pairs": cfg.steps_per_phase * cfg.batch_size, "max_new_tokens": cfg.max_new_tokens}
    pairs = {}
    for layout in ("train", "replicated"):
        r = _timed_collection(loop.collect_pairs, cfg.replace(sampling_layout=layout), run, run.model.params, key,
                              args.repeats)
        pairs[layout] = r.pop("pairs")
        res[layout] = r
        print(f"sampling_layout={layout:10s}: first call {r['first_s']:7.2f} s (compilation included), "
              f"median of {args.repeats} more {r['median_s'] or float('nan'):7.2f} s", flush=True)
    same = np.ones(res["pairs"] // jax.process_count(), bool)
    for k in ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask"):
        same &= (pairs["train"][k] == pairs["replicated"][k]).all(axis=1)
    res["same_pairs"] = int(same.sum())  # pairs equal token for token (summation order may flip a rare draw)
    print(f"{res['pairs']} pairs of {cfg.max_new_tokens} new tokens on {res['devices']} x {res['device']}, mesh "
          f"{res['mesh']}; pairs equal token for token in both layouts: {res['same_pairs']} of {len(same)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
