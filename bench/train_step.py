"""Seconds per step, tokens/s and peak memory of the jitted DAP train step, optionally against TRL + torch AdamW.

    python bench/train_step.py [--pairs 8] [--prompt-len 128] [--response-len 128] [--lora-rank 0] \
        [--ensemble 1] [--reference sft|behavior] [--remat none|full|dots] [--logprob-chunk 0] [--share-prompt on] \
        [--param-dtype float32] [--dtype auto] \
        [--repeats 3] [--model smollm2-135m-instruct] [--random] [--peer trl] [--profile DIR] [--json out.json]

What runs: the step the online loop runs, ``bpo_jax.train.step.make_train_step`` (jitted, state donated, base
weights read-only) on a state from ``bpo_jax.train.state.create_state``, with a ``TrainConfig`` built from the flags.
The batch is random but laid out as the sampler lays it out (``train_step.BATCH_KEYS``): ``pairs`` prompts
left-padded to ``--prompt-len`` (real lengths drawn from [P/2, P]), each followed by a chosen and a rejected
response right-padded to ``--response-len`` (lengths drawn from [N/2, N], ending in EOS when shorter than N),
random token ids, and behavior log-probs of a plausible size (they are the reference under
``--reference behavior``, so no reference forward runs then; ``sft`` runs one forward under the base weights).

What is timed (``time.perf_counter`` around a call and ``jax.block_until_ready`` of its outputs):
  * first call: tracing + XLA compilation + one step ("compile" below is first call − median step);
  * step: the median over ``--repeats`` further steps. Batch building, state creation and model loading are
    excluded. tokens/s = pairs · 2 · (prompt + response) / step, padding included (the step computes on it).
Memory: peak RSS while the timed steps run (``/proc/self/clear_refs`` resets ``VmHWM`` to the current RSS just
before them; Linux only), XLA's ``compiled.memory_analysis()`` (temporary buffers; arguments + outputs −
aliased) of the very executable the loop runs, and on an accelerator the device allocator's peak bytes.

Model FLOPs utilisation (printed on an accelerator, or on any backend with ``--peak-tflops``), PaLM-style model
FLOPs, not hardware FLOPs (rematerialisation is not counted):
    policy    = E · (6 · N · tokens + 3 · S · 4 · L · T² · d)      per step, E = ensemble members
    reference = 2 · N · tokens + S · 4 · L · T² · d                 only with --reference sft
    N = parameters in matmuls the tokens pass through: every decoder-layer weight + the output head (V · D; the
        embedding lookup is not a matmul). Under LoRA the backward still runs through N (6·N is the usual
        approximation; it counts the frozen weights' gradient matmuls that LoRA skips), and the head is counted on
        all positions although the step unembeds only response positions.
    tokens = S · T with S = 2 · pairs sequences of T = prompt + response positions; d = heads · head_dim;
        these are the job's FLOPs with two rows per pair (as TRL runs it): ``--share-prompt on`` (the default)
        runs the prompt once per pair and so does fewer, and its MFU by this count is the job's, not the chip's;
    4 · L · T² · d = the forward's QKᵀ and AV matmuls (2 · T² · d each, no causal halving), ×3 for fwd+bwd.
MFU = FLOPs / step time / (peak bf16 dense FLOP/s of one device, from ``PEAK_BF16_FLOPS`` by device kind).
The step runs on one device (no mesh), so the peak is one device's.

``--peer trl``: the same weights (exported with ``save_pretrained`` into a temporary folder and loaded by
transformers' ``AutoModelForCausalLM`` in float32), the same shapes and the very same batch (passed through TRL's
``DataCollatorForPreference``, i.e. right-padded prompt+response rows, chosen then rejected) in a subprocess
(``bench/trl_peer.py``), so its peak RSS is its own. One optimizer step is: ``DPOTrainer.compute_loss`` on a
``DPOTrainer`` shell (built as ``tests/test_losses_trl.py`` builds it, plus the fused LM head
``DPOTrainer.__init__`` adds), which runs the policy forward on chosen+rejected concatenated, the reference
forward when ``--reference sft`` (a second copy of the model, as TRL makes one for full fine-tuning; LoRA: the
base with the adapter disabled; ``behavior``: TRL's precomputed-reference path, fed the batch's behavior
log-probs) and TRL's loss; then
``backward``, grad-norm clipping and ``torch.optim.AdamW``. Timed like ours: one warm-up step, then the median of
``--repeats``; its tokens/s counts the same pairs · 2 · (prompt + response) although TRL pads less. Both
rows and the ratios (bpo_jax / TRL; < 1 means bpo_jax is faster / smaller) are printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import trl_peer  # noqa: E402  (bench/, next to this script)
from rss import MiB, peak_rss, peak_rss_reset  # noqa: E402

# Peak dense bfloat16 FLOP/s of one JAX device, by a substring of ``device_kind`` (first match wins).
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("A100", 312e12),
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5p", 459e12), ("TPU v5", 459e12), ("TPU v4", 275e12),
)


def peak_flops(kind: str) -> float | None:
    return next((v for k, v in PEAK_BF16_FLOPS if k.lower() in kind.lower()), None)


def model_flops(mc, params_shapes, *, pairs: int, prompt_len: int, response_len: int, ensemble: int,
                reference: str) -> dict:
    """The module docstring's formula: ``{"policy", "reference", "total", "n_matmul_params"}``."""
    shapes = [tuple(getattr(x, "shape", x)) for x in _leaves(params_shapes["layers"])]
    layers = sum(int(np.prod(s)) for s in shapes if len(s) == 3)  # stacked [L, in, out] weights; not norms/biases
    head = mc.vocab_size * mc.hidden_size
    n = layers + head
    seqs, t = 2 * pairs, prompt_len + response_len
    tokens = seqs * t
    attn_fwd = seqs * 4 * mc.num_layers * t * t * mc.num_heads * mc.head_dim
    policy = ensemble * (6 * n * tokens + 3 * attn_fwd)
    ref = 2 * n * tokens + attn_fwd if reference == "sft" else 0
    return {"policy": float(policy), "reference": float(ref), "total": float(policy + ref), "n_matmul_params": n}


def _leaves(tree):
    if isinstance(tree, dict):  # a tuple is a shape (param_shapes), not a container
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


def make_batch(vocab_size: int, eos_id: int, pad_id: int, *, pairs: int, prompt_len: int, response_len: int,
               seed: int = 0) -> dict:
    """A random batch in ``train_step``'s layout (NumPy): left-padded prompts, right-padded responses."""
    rng = np.random.default_rng(seed)
    t = prompt_len + response_len
    p_lens = rng.integers(max(1, prompt_len // 2), prompt_len + 1, pairs)
    out = {}
    n_lens = {}
    prompt = np.full((pairs, prompt_len), pad_id, np.int32)
    pmask = np.zeros((pairs, prompt_len), np.int32)
    for i, p in enumerate(p_lens):
        prompt[i, prompt_len - p:] = rng.integers(3, vocab_size, p)
        pmask[i, prompt_len - p:] = 1
    for side in ("chosen", "rejected"):
        lens = rng.integers(max(1, response_len // 2), response_len + 1, pairs)
        resp = np.full((pairs, response_len), pad_id, np.int32)
        rmask = np.zeros((pairs, response_len), np.int32)
        for i, n in enumerate(lens):
            resp[i, :n] = rng.integers(3, vocab_size, n)
            if n < response_len:
                resp[i, n - 1] = eos_id
            rmask[i, :n] = 1
        out[f"{side}_ids"] = np.concatenate([prompt, resp], axis=1)
        out[f"{side}_mask"] = np.concatenate([pmask, rmask], axis=1)
        out[f"{side}_behavior_logps"] = (-lens * rng.uniform(0.5, 2.0, pairs)).astype(np.float32)
        n_lens[side] = lens
    out["truncated"] = ((n_lens["chosen"] == response_len).astype(np.float32)
                        + (n_lens["rejected"] == response_len)) / 2
    assert out["chosen_ids"].shape == (pairs, t)
    return out


# ---------------------------------------------------------------------------------------------------- bpo_jax


def run_bpo_jax(args, export_dir: str | None) -> dict:
    import gc

    import jax

    from bpo_jax import config as config_module
    from bpo_jax.config import ConfigError, TrainConfig
    from bpo_jax.models import Decoder, init_params, load_pretrained, loading, param_shapes, save_pretrained
    from bpo_jax.train import state as st
    from bpo_jax.train import step as ts

    dtype = args.dtype
    if dtype == "auto":
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    remat = args.remat
    keys = getattr(config_module, "KEY_GROUP", None) or TrainConfig.__dataclass_fields__  # older checkouts: flat
    extra = {}
    if args.logprob_chunk:
        if "logprob_chunk" not in keys:
            sys.exit("--logprob-chunk: this checkout's TrainConfig has no logprob_chunk")
        extra["logprob_chunk"] = args.logprob_chunk
    if "share_prompt" in keys:
        extra["share_prompt"] = args.share_prompt == "on"
    elif args.share_prompt == "on":
        print("(this checkout's TrainConfig has no share_prompt: two rows per pair)", file=sys.stderr)
    try:
        cfg = TrainConfig(model=args.model, total_steps=1000, num_phases=1, batch_size=args.pairs,
                          micro_batches=args.micro_batches, max_new_tokens=args.response_len,
                          lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, ensemble_size=args.ensemble,
                          reference=args.reference, loss_type=args.loss_type, param_dtype=args.param_dtype,
                          dtype=dtype, remat=remat, attention=args.attention, **extra)
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    numerics = dict(param_dtype=args.param_dtype, dtype=dtype, remat=remat, attention=args.attention)
    t0 = time.perf_counter()
    if args.random:  # the architecture only (GGUF metadata / config.json), random weights of its shapes
        path = loading.resolve(args.model)
        if path.endswith(".gguf"):
            from bpo_jax.models import gguf_source

            mc, _, tok = gguf_source.open_gguf(path, **numerics)
        else:
            mc, _, tok = loading.open_hf_folder(path, **numerics)
        params = init_params(mc, jax.random.key(0))
    else:
        model, tok = load_pretrained(args.model, **numerics)
        mc, params = model.config, model.params
        del model
    load_s = time.perf_counter() - t0
    gc.collect()
    eos = mc.eos_token_id if not isinstance(mc.eos_token_id, tuple) else mc.eos_token_id[0]
    pad = mc.pad_token_id if mc.pad_token_id is not None else 0
    np_batch = make_batch(mc.vocab_size, eos if eos is not None else 2, pad, pairs=args.pairs,
                          prompt_len=args.prompt_len, response_len=args.response_len)
    batch = {k: jax.numpy.asarray(v) for k, v in np_batch.items()}

    state = st.create_state(cfg, params, jax.random.key(1), compute_dtype=mc.dtype)  # π_β as train keeps it
    del params
    step = ts.make_train_step(cfg, mc, st.shardings(state), prompt_len=args.prompt_len)
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready((state, m))
    first_s = time.perf_counter() - t0
    gc.collect()
    rss_ok = peak_rss_reset()
    rss_before = peak_rss() if rss_ok else None
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t0)
    rss_peak = peak_rss() if rss_ok else None
    if args.profile:  # one more step, under the profiler (after the measured ones): per-op times
        import profile_ops

        with jax.profiler.trace(args.profile, create_perfetto_trace=True):
            state, m = step(state, batch)
            jax.block_until_ready((state, m))
        print(profile_ops.summary(args.profile))
    med = statistics.median(times)
    if export_dir is not None:  # after the measurement (its host copies would raise our RSS baseline): the peer's
        # weights are these very ones (the frozen base, as the steps started from) and its batch this very one
        save_pretrained(Decoder.from_params(mc, state.base), tok, export_dir)
        np.savez(os.path.join(os.path.dirname(export_dir), "batch.npz"), **np_batch)

    # The executable the loop runs (make_train_step's jitted function, from its closure; lowering again hits
    # the compilation cache the first call filled, so this does not compile twice).
    temp = args_out = None
    jitted = next((c.cell_contents for c in (step.__closure__ or ()) if hasattr(c.cell_contents, "lower")), None)
    if jitted is not None:
        try:
            ma = jitted.lower(state.replace(base=None), state.base, batch).compile().memory_analysis()
            if ma is not None:
                temp = ma.temp_size_in_bytes / MiB
                args_out = (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes) / MiB
        except Exception as err:  # memory_analysis is best-effort across backends
            print(f"(no memory_analysis: {type(err).__name__}: {err})", file=sys.stderr)
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    device_peak = None
    try:
        stats = dev.memory_stats()
        if stats and "peak_bytes_in_use" in stats:
            device_peak = stats["peak_bytes_in_use"] / MiB
    except Exception:  # noqa: BLE001  CPU devices have none
        pass
    flops = model_flops(mc, param_shapes(mc), pairs=args.pairs, prompt_len=args.prompt_len,
                        response_len=args.response_len, ensemble=args.ensemble, reference=args.reference)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(kind)
    show_mfu = jax.default_backend() != "cpu" or bool(args.peak_tflops)
    tokens = args.pairs * 2 * (args.prompt_len + args.response_len)
    trainable = jax.tree.leaves(state.trainable)
    return {
        "device": f"{kind} ({jax.default_backend()})", "jax": jax.__version__,
        "model_config": {"layers": mc.num_layers, "hidden": mc.hidden_size, "vocab": mc.vocab_size,
                         "param_dtype": mc.param_dtype, "dtype": mc.dtype, "remat": mc.remat},
        "params_M": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.base)) / 1e6,
        "trainable_M": sum(x.size for x in trainable) / 1e6,
        "load_s": load_s, "first_call_s": first_s, "compile_s": max(0.0, first_s - med),
        "step_s": med, "step_times_s": times, "tokens_per_step": tokens, "tokens_per_s": tokens / med,
        "peak_rss_mib": None if rss_peak is None else rss_peak / MiB,
        "rss_before_steps_mib": None if rss_before is None else rss_before / MiB,
        "compiled_temp_mib": temp, "compiled_args_out_mib": args_out, "device_peak_mib": device_peak,
        "loss": float(m["loss"]), "model_flops": flops, "share_prompt": getattr(cfg, "share_prompt", None),
        "peak_flops": peak, "mfu": (flops["total"] / med / peak) if (show_mfu and peak) else None,
        "mfu_note": None if not show_mfu else ("unknown peak" if not peak else None),
    }


# ---------------------------------------------------------------------------------------------------- main


def _fmt(v, spec):
    width = "".join(c for c in spec.split(".")[0] if c.isdigit())
    return format("-", f">{width}") if v is None else format(v, spec)


def print_table(res: dict, args) -> None:
    ours = res["bpo_jax"]
    lora = f"LoRA r={args.lora_rank} x{args.ensemble}" if args.lora_rank else "full fine-tuning"
    mc = ours["model_config"]
    print(f"device: {ours['device']}, jax {ours['jax']}; model {args.model}{' (random weights)' if args.random else ''}"
          f": {ours['params_M']:.1f}M params, {ours['trainable_M']:.2f}M trained ({lora}); param_dtype "
          f"{mc['param_dtype']}, dtype {mc['dtype']}, remat {args.remat}, attention {args.attention}; "
          f"{args.pairs} pairs x ({args.prompt_len} + "
          f"{args.response_len}) tokens, micro_batches {args.micro_batches}, reference={args.reference}, "
          f"{args.loss_type}{f', logprob_chunk {args.logprob_chunk}' if args.logprob_chunk else ''}, share_prompt "
          f"{ours.get('share_prompt')}")
    rows = [("bpo_jax", ours)]
    if "trl" in res:
        rows.append(("trl", res["trl"]))
        print(f"peer: {res['trl']['device']}, float32, batch padded to {res['trl']['padded_shape']}")
    print(f"{'':8} {'step s':>8} {'tokens/s':>10} {'first call s':>12} {'peak RSS MiB':>12} "
          f"{'XLA temp MiB':>12} {'args+out MiB':>12} {'loss':>8}")
    for name, r in rows:
        print(f"{name:8} {r['step_s']:8.3f} {r['tokens_per_s']:10.1f} {r['first_call_s']:12.2f} "
              f"{_fmt(r.get('peak_rss_mib'), '12.0f')} {_fmt(r.get('compiled_temp_mib'), '12.1f')} "
              f"{_fmt(r.get('compiled_args_out_mib'), '12.1f')} {r['loss']:8.4f}")
    for name, r in rows:
        if r.get("device_peak_mib") is not None:
            print(f"{name}: device peak bytes in use {r['device_peak_mib']:.0f} MiB")
    if ours["mfu"] is not None or ours["mfu_note"]:
        f = ours["model_flops"]
        mfu = f"{100 * ours['mfu']:.1f}%" if ours["mfu"] is not None else ours["mfu_note"]
        print(f"MFU {mfu}: {f['total'] / 1e12:.3f} TFLOP/step (policy {f['policy'] / 1e12:.3f}, reference "
              f"{f['reference'] / 1e12:.3f}; N = {f['n_matmul_params'] / 1e6:.1f}M matmul params) over "
              f"{ours['step_s']:.3f} s, peak {_fmt(ours['peak_flops'] and ours['peak_flops'] / 1e12, '.0f')} TFLOP/s")
    if "ratio" in res:
        r = res["ratio"]
        print(f"bpo_jax / trl: step time {r['step_time']:.2f}x, peak RSS {_fmt(r['peak_rss'], '.2f')}x"
              + (f", device peak {r['device_peak']:.2f}x" if r.get("device_peak") else ""))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="shipped name, HF folder or .gguf")
    p.add_argument("--random", action="store_true", help="random weights of the model's shapes (skips loading)")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--response-len", type=int, default=128)
    p.add_argument("--micro-batches", type=int, default=1)
    p.add_argument("--lora-rank", type=int, default=0, help="0 = full fine-tuning")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--ensemble", type=int, default=1)
    p.add_argument("--reference", default="sft", choices=("sft", "behavior"),
                   help="behavior: the batch's sampler log-probs are the reference (no reference forward)")
    p.add_argument("--remat", default="none", choices=("none", "full", "dots"),
                   help="per-layer rematerialisation, the config's remat (TRL peer: gradient checkpointing unless "
                        "none)")
    p.add_argument("--logprob-chunk", type=int, default=0,
                   help="the config's logprob_chunk: unembed this many response positions at a time (0 = all)")
    p.add_argument("--share-prompt", default="on", choices=("on", "off"),
                   help="the config's share_prompt: one [prompt | chosen | rejected] row per pair (on) or two rows")
    p.add_argument("--attention", default="xla", choices=("xla", "cudnn"),
                   help="the config's attention: cudnn = NVIDIA's fused attention (needs --dtype bfloat16)")
    p.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="compute dtype; auto = float32 on CPU, bfloat16 on accelerators")
    p.add_argument("--loss-type", default="sigmoid")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--learning-rate", type=float, default=5e-5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peer", choices=("trl",), default=None, help="also time TRL's DPO loss + torch AdamW")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s for MFU (default: by device kind)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="trace one more step with jax.profiler into DIR and print its per-op times")
    p.add_argument("--json", default=None, help="write the figures to this file")
    args = p.parse_args(argv)
    if min(args.pairs, args.prompt_len, args.response_len, args.repeats) < 1:
        p.error("--pairs, --prompt-len, --response-len and --repeats must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    tmp = None
    if args.peer == "trl":
        missing = [m for m in ("torch", "trl", "accelerate") + (("peft",) if args.lora_rank else ())
                   if importlib.util.find_spec(m) is None]
        if missing:
            print(f"--peer trl needs {', '.join(missing)} (pip install -r requirements-test.txt); not installed",
                  file=sys.stderr)
            return 2
        if args.ensemble != 1:
            print("--peer trl: TRL trains one model; use --ensemble 1", file=sys.stderr)
            return 2
        tmp = tempfile.TemporaryDirectory(prefix="bpo_bench_trl_")
    res = {"args": vars(args)}
    res["bpo_jax"] = run_bpo_jax(args, os.path.join(tmp.name, "model") if tmp else None)
    if tmp is not None:
        res["trl"] = trl_peer.run(args, tmp.name)
        ours, peer = res["bpo_jax"], res["trl"]
        res["ratio"] = {"step_time": ours["step_s"] / peer["step_s"],
                        "peak_rss": (ours["peak_rss_mib"] / peer["peak_rss_mib"]
                                     if ours["peak_rss_mib"] and peer["peak_rss_mib"] else None),
                        "device_peak": (ours["device_peak_mib"] / peer["device_peak_mib"]
                                        if ours.get("device_peak_mib") and peer.get("device_peak_mib") else None)}
        tmp.cleanup()
    print_table(res, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
