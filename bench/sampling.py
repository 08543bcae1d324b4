"""Sampling throughput: bpo_jax.sample.sampler.generate vs HF transformers generate (PyTorch) on the same weights.

    python bench/sampling.py [--model smollm2-135m-instruct] [--batches 1 8 32] [--prompt-len 64] [--new 64]
                             [--num-samples 1] [--skip-hf] [--lora R --members N]

Loads the model, exports it with ``save_pretrained`` and loads that folder into HF transformers, so both sides
decode the very same float32 weights. Prints tokens/s per batch size (64-token prompts, 64 new tokens, no
early stop), the ratio to HF, and the weight-read floor: parameter bytes (plus the KV cache read per step) /
memory bandwidth (30 GB/s assumed for a CPU, the spec figure for a known GPU; ``--bandwidth-gbs`` overrides).

``--lora R --members N`` (no HF side): a random ensemble of N rank-R adapters on every target, sampled the way
π_β samples (``lora.attach_merged``: the merged adapter in activation space, rank N·R under ``mean_delta``)
against the old merged weights (``lora.merge``: W + ΔW, plain weights); prints tokens/s of both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bpo_jax.models import load_pretrained, save_pretrained  # noqa: E402
from bpo_jax.sample.sampler import Decoding, generate  # noqa: E402

# Spec memory bandwidths (GB/s) by device-kind substring.
_BANDWIDTH = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0, "TPU v4": 1200.0, "TPU v5e": 819.0, "TPU v5p": 2765.0}


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--num-samples", type=int, default=1,
                   help="samples per prompt (BPO collects 2: each prompt is prefilled once, its cache copied)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bandwidth-gbs", type=float, default=None)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--lora", type=int, default=0, help="rank of a random LoRA ensemble: activation space vs merged")
    p.add_argument("--members", type=int, default=1)
    p.add_argument("--merge", default="mean_delta", help="ensemble_merge rule (mean_delta | peft_linear)")
    args = p.parse_args()
    n = args.num_samples

    model, tok = load_pretrained(args.model)
    cfg = model.config
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    bw = args.bandwidth_gbs or next((v for k, v in _BANDWIDTH.items() if k in kind), 30.0)
    n_params = sum(x.size for x in jax.tree.leaves(model.params))
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(model.params))
    print(f"device: {kind} ({jax.device_count()}x), jax {jax.__version__}; model {args.model}: {n_params / 1e6:.1f}M "
          f"params, {cfg.param_dtype}; prompt {args.prompt_len}, new tokens {args.new}, {n} sample(s) per prompt; "
          f"bandwidth {bw:.0f} GB/s")

    if args.lora:
        return _lora_vs_merged(model, args)

    # Export first (NumPy only), then time bpo_jax for every batch size before PyTorch is even imported: torch's
    # OpenMP threads keep spinning after its own work and would slow the JAX side down in a shared process.
    out_dir = tempfile.mkdtemp(prefix="bpo_bench_")
    if not args.skip_hf:
        save_pretrained(model, tok, out_dir)
    rng = np.random.default_rng(0)
    prompts = {b: rng.integers(100, cfg.vocab_size - 100, size=(b, args.prompt_len)).astype(np.int32)
               for b in args.batches}
    ours = {}
    decoding = Decoding(max_new_tokens=args.new, temperature=1.0, num_samples=n)
    for b, ids in prompts.items():
        run = lambda: jax.block_until_ready(  # noqa: E731
            generate(model, ids, np.ones_like(ids), decoding, rng=jax.random.key(0)).tokens)
        run()  # compile
        ours[b] = b * n * args.new / _median_time(run, args.repeats)
        print(f"bpo_jax batch {b}: {ours[b]:.1f} tok/s", flush=True)  # as it comes: HF's side may take long

    hf_tps = {b: float("nan") for b in args.batches}
    if not args.skip_hf:
        import torch
        from transformers import AutoModelForCausalLM

        dev = "cuda" if torch.cuda.is_available() else "cpu"
        hf = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval().to(dev)
        print(f"HF transformers in PyTorch {torch.__version__} on {dev}, {torch.get_num_threads()} threads, same "
              f"weights")
        for b, ids in prompts.items():
            def hf_run():
                with torch.no_grad():
                    hf.generate(torch.tensor(ids, dtype=torch.long, device=dev),
                                attention_mask=torch.ones(ids.shape, device=dev),
                                do_sample=True, max_new_tokens=args.new, min_new_tokens=args.new, top_k=0,
                                pad_token_id=0, num_return_sequences=n)
                if dev == "cuda":
                    torch.cuda.synchronize()

            hf_run()
            hf_tps[b] = b * n * args.new / _median_time(hf_run, max(1, args.repeats - 1))
            print(f"HF batch {b}: {hf_tps[b]:.1f} tok/s", flush=True)

    print(f"{'batch':>5} {'bpo_jax tok/s':>14} {'HF tok/s':>9} {'x HF':>6} {'floor tok/s':>12} {'of floor':>9}")
    for b in args.batches:
        # One decode step reads every weight once plus the KV cache filled so far (on average half of it).
        kv_bytes = 2 * cfg.num_layers * b * n * (args.prompt_len + args.new / 2) * cfg.kv_size * 4
        floor_tps = b * n / ((weight_bytes + kv_bytes) / (bw * 1e9))
        print(f"{b:>5} {ours[b]:>14.1f} {hf_tps[b]:>9.1f} {ours[b] / hf_tps[b]:>6.2f} {floor_tps:>12.1f} "
              f"{ours[b] / floor_tps:>9.2f}")

def _lora_vs_merged(model, args):
    """Tokens/s of the sampler on π_β's activation-space adapters vs on the merged weights (see the docstring)."""
    from bpo_jax.models import lora

    key = jax.random.key(1)
    factors = lora.init_lora(key, model.params["layers"], targets=lora.TARGETS, rank=args.lora,
                             num_adapters=args.members)
    factors = {t: {**f, "b": 0.01 * jax.random.normal(jax.random.fold_in(key, i), f["b"].shape)}
               for i, (t, f) in enumerate(factors.items())}
    variants = {"merged (lora.merge)": lora.merge(model.params, factors, 2.0, args.merge),
                "activation (lora.attach_merged)": lora.attach_merged(model.params, factors, 2.0, args.merge)}
    rng = np.random.default_rng(0)
    for b in args.batches:
        ids = rng.integers(100, model.config.vocab_size - 100, size=(b, args.prompt_len)).astype(np.int32)
        decoding = Decoding(max_new_tokens=args.new, temperature=1.0, num_samples=args.num_samples)
        runs = {name: (lambda p=params: jax.block_until_ready(
                    generate(p, ids, np.ones_like(ids), decoding, config=model.config, rng=jax.random.key(0)).tokens))
                for name, params in variants.items()}
        times = {name: [] for name in runs}
        for name, run in runs.items():
            run()  # compile
        for _ in range(args.repeats):  # interleaved, so load from other work hits both alike
            for name, run in runs.items():
                times[name].append(_median_time(run, 1))
        for name, ts in times.items():
            tok = b * args.num_samples * args.new
            print(f"batch {b} x {args.num_samples}, LoRA r={args.lora} x {args.members} ({args.merge}), {name}: "
                  f"{tok / statistics.median(ts):.1f} tok/s median, {tok / min(ts):.1f} best of {len(ts)}",
                  flush=True)


if __name__ == "__main__":
    main()
