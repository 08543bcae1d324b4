"""TRL's DPO step on the weights and batch ``bench/train_step.py`` exported: the ``--peer trl`` side of that script.

``train_step.py`` calls ``run``, which starts this file as a subprocess (its own process, so its peak RSS is its
own and no JAX runs beside torch): ``python bench/trl_peer.py FOLDER [--pairs ...]``. It imports no bpo_jax and
no jax; it needs torch, trl and accelerate (peft for LoRA), the test extras.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from rss import MiB, peak_rss, peak_rss_reset


def run_worker(args) -> dict:
    """In the subprocess: TRL's DPO loss + torch AdamW on the exported weights and the saved batch."""
    import collections

    import accelerate
    import torch
    import trl
    from transformers import AutoModelForCausalLM
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.utils import add_fused_lm_head

    folder = args.folder
    batch = dict(np.load(os.path.join(folder, "batch.npz")))
    behavior = args.reference == "behavior"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    load = lambda: AutoModelForCausalLM.from_pretrained(os.path.join(folder, "model"),  # noqa: E731
                                                        dtype=torch.float32).to(device)
    model = load()
    if args.remat != "none":  # HF has one policy: recompute each layer (our "full")
        model.gradient_checkpointing_enable()
    ref_model = None
    if args.lora_rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    elif not behavior:  # full fine-tuning against the SFT model: TRL loads a second copy as the reference
        ref_model = load().eval().requires_grad_(False)
        add_fused_lm_head(ref_model)
    # DPOTrainer.__init__'s fused LM head, with the outputs its metrics read.
    add_fused_lm_head(model.get_base_model() if args.lora_rank else model,
                      outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    model.train()

    targs = trl.DPOConfig(output_dir=tempfile.mkdtemp(), precompute_ref_log_probs=behavior, report_to=[],
                          use_cpu=device == "cpu", beta=args.beta,
                          loss_type={"dpo": "sigmoid", "slic": "hinge"}.get(args.loss_type, args.loss_type))
    t = object.__new__(trl.DPOTrainer)  # the attributes _compute_loss reads, as DPOTrainer.__init__ sets them
    t.args, t.model, t.ref_model = targs, model, ref_model
    t.accelerator = accelerate.Accelerator(cpu=device == "cpu")
    t.beta, t.precompute_ref_logps = targs.beta, targs.precompute_ref_log_probs
    t.loss_types = targs.loss_type
    t.loss_weights = targs.loss_weights or [1.0] * len(t.loss_types)
    t.ld_alpha, t.label_smoothing, t.use_weighting = targs.ld_alpha, targs.label_smoothing, targs.use_weighting
    t.f_divergence_type, t.f_alpha_divergence_coef = targs.f_divergence_type, targs.f_alpha_divergence_coef
    t.aux_loss_enabled = False
    t._metrics = {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}
    t._total_train_tokens, t._tp_size = 0, 1

    p = args.prompt_len
    examples = []
    for i in range(args.pairs):
        ex = {"prompt_ids": batch["chosen_ids"][i, :p][batch["chosen_mask"][i, :p] == 1].tolist()}
        for side in ("chosen", "rejected"):
            ex[f"{side}_ids"] = batch[f"{side}_ids"][i, p:][batch[f"{side}_mask"][i, p:] == 1].tolist()
            if behavior:
                ex[f"ref_{side}_logps"] = float(batch[f"{side}_behavior_logps"][i])
        examples.append(ex)
    pad = int(json.load(open(os.path.join(folder, "model", "config.json"))).get("pad_token_id") or 0)
    inputs = DataCollatorForPreference(pad_token_id=pad)(examples)
    inputs = {k: v.to(device) for k, v in inputs.items()}

    trained = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trained, lr=args.learning_rate, eps=1e-8, weight_decay=0.0)

    def one_step():
        opt.zero_grad(set_to_none=True)
        loss = t.compute_loss(model, inputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    t0 = time.perf_counter()
    one_step()  # warm-up: allocates AdamW's moments
    first_s = time.perf_counter() - t0
    rss_ok = peak_rss_reset()
    times, loss = [], float("nan")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        loss = one_step()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    tokens = args.pairs * 2 * (args.prompt_len + args.response_len)
    rss = peak_rss() if rss_ok else None
    # like JAX's peak_bytes_in_use: the allocator's peak since the process started (weights, moments, warm-up)
    dev_peak = torch.cuda.max_memory_allocated() / MiB if device == "cuda" else None
    return {"device": f"torch {torch.__version__} {device} ({torch.get_num_threads()} threads), trl {trl.__version__}",
            "first_call_s": first_s, "step_s": med, "step_times_s": times, "tokens_per_s": tokens / med,
            "padded_shape": list(inputs["input_ids"].shape), "trainable_M": sum(q.numel() for q in trained) / 1e6,
            "peak_rss_mib": None if rss is None else rss / MiB, "device_peak_mib": dev_peak, "loss": loss}


def run(args, folder: str) -> dict:
    """Run the worker on ``folder`` (``model/`` and ``batch.npz``, written by ``train_step.py``) in a subprocess,
    with the flags of ``args`` it reads; return its figures."""
    cmd = [sys.executable, os.path.abspath(__file__), folder]
    for flag in ("pairs", "prompt_len", "response_len", "lora_rank", "lora_alpha", "reference", "remat", "repeats",
                 "loss_type", "beta", "learning_rate"):  # what the peer reads
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        sys.exit(f"the TRL peer failed (exit {proc.returncode})")
    with open(os.path.join(folder, "trl.json")) as f:
        return json.load(f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="holds model/ (an HF folder) and batch.npz; trl.json is written there")
    for flag in ("pairs", "prompt-len", "response-len", "lora-rank", "repeats"):
        p.add_argument(f"--{flag}", type=int, required=True)
    for flag in ("lora-alpha", "beta", "learning-rate"):
        p.add_argument(f"--{flag}", type=float, required=True)
    for flag in ("reference", "remat", "loss-type"):
        p.add_argument(f"--{flag}", required=True)
    args = p.parse_args(argv)
    res = run_worker(args)
    with open(os.path.join(args.folder, "trl.json"), "w") as f:
        json.dump(res, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
