"""TRL's ``OnlineDPOTrainer`` on the run ``bench/online_loop.py --peer trl`` describes: the TRL side of that script.

``online_loop.py`` first runs its bpo_jax side, which writes into one folder the policy's SFT weights
(``model/``: ``bpo_jax.models.save_pretrained``, float32) and ``spec.json`` (the run's settings and, step by step,
the prompts bpo_jax sampled from, each with its gold summary); then it calls ``run``, which starts this file as a
subprocess (``python bench/trl_online.py FOLDER``: its own process, so its peak RSS is its own, and no JAX beside
torch). It imports no bpo_jax and no jax; it needs torch, trl, accelerate, peft and datasets (the test extras).

What runs: ``trl.experimental.online_dpo.OnlineDPOTrainer`` (TRL 1.16), ``use_vllm=False``, on the exported
weights (``AutoModelForCausalLM``, float32; CUDA when torch sees one, else the CPU), for ``steps`` optimizer
steps of ``batch_size`` prompts, one step per batch, the prompts of each step those bpo_jax sampled from at that
step, in that order (``train_sampling_strategy="sequential"``). Each prompt is one user turn, so TRL applies the
chat template as bpo_jax does. The reward is ``rouge_l_f1`` below against the prompt's gold summary, the minisum
gold reward (``bpo_jax.eval.annotators.RougeAnnotator``), as a TRL reward function. LoRA (``peft_config``: r, α,
the same targets, no dropout) or full fine-tuning (TRL then copies the model as the reference); the reference is
the SFT model (LoRA: the adapter disabled). AdamW (transformers' default ``optim``), the learning rate decayed
linearly (or cosine) to 0 over the steps without warmup, weight decay, ε and grad-norm clipping as bpo_jax's
config. Gradient checkpointing when bpo_jax rematerialises (``remat`` not ``none``), as ``bench/trl_peer.py``
does; generation keeps its KV cache all the same (``generation_kwargs={"use_cache": True}``: TRL would otherwise
turn it off under gradient checkpointing, which bpo_jax's sampler never does).

What is timed (``time.perf_counter``; torch runs synchronously on the CPU, and on CUDA each timed call ends with
``torch.cuda.synchronize``): a step is the time between two ``on_step_end`` callbacks (the first from
``on_train_begin``), so it holds everything the trainer does per step. Its parts, by wrapping the trainer's own
methods on the instance: generate (``_generate``: chat template, tokenization, ``model.generate``, EOS
truncation), policy forward (``_forward`` with gradients on), reference forward (``_forward`` under
``no_grad``), decoding to text (the tokenizer's ``batch_decode``), reward (``_calculate_rewards_from_functions``),
backward (``accelerator.backward``), grad clipping (``_clip_grad_norm``), optimizer (from
``on_pre_optimizer_step`` to ``on_optimizer_step``); "other" is the step minus these (loss and statistics,
data loading, the LR scheduler, logging). Peak RSS: ``VmHWM`` over the whole process, and again from the end of
the warm-up steps to the end (``/proc/self/clear_refs``).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time

from rss import MiB, peak_rss, peak_rss_reset

LOSSES = ("sigmoid",)  # OnlineDPOTrainer also has "ipo", on summed log-probs; ours may length-normalise
SCHEDULES = {"linear": "linear", "cosine": "cosine"}  # bpo_jax lr_schedule -> transformers lr_scheduler_type
HF_TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
              "down": "down_proj"}
# What always differs between the two runs (bench/online_loop.py prints these after the run's own counts).
NOT_MATCHED = (
    "prompts: bpo_jax encodes them once at set-up (outside the steps) and left-pads every batch to one width, the "
    "longest training prompt, so it compiles once; TRL applies the chat template and tokenizes in every generate "
    "call (inside its generate part) and pads to the batch's longest prompt",
    "rows: bpo_jax's step runs one [prompt | chosen | rejected] row per pair (share_prompt) and unembeds "
    "logprob_chunk positions at a time; TRL runs the policy and the reference forward on all 2 x batch "
    "prompt + completion rows with a full-vocabulary log-softmax",
    "BPO's own work per step, with no TRL counterpart: pi_beta <- pi_theta (behavior sync and merge), the "
    "phase-start log-prob gap checks and a checkpoint at every phase end (every step when F = T); TRL saves nothing",
    "optimizer: optax's AdamW against torch's (transformers' default optim); the same betas (0.9, 0.999), eps, "
    "weight decay, grad-norm clipping and schedule (to 0 over the T steps, no warmup)",
    "compilation: bpo_jax compiles its programs in its first steps (the warm-up steps, outside the medians); "
    "torch runs eagerly",
    "statistics: TRL computes and gathers KL, entropy and reward means every step (in its 'other'); bpo_jax's "
    "metrics come out of its train step",
)
TRL_ROWS = ("generate", "policy forward", "reference forward", "decoding to text", "reward", "backward",
            "grad clipping", "optimizer")

# The minisum gold reward, ROUGE-L F1 on lower-cased alphanumeric words, as bpo_jax.eval.annotators computes it.
# A copy, because importing bpo_jax here would load JAX into the torch process (~150 MB of its RSS);
# tests/test_bench.py checks that it equals bpo_jax's on sampled texts.
_WORD = re.compile(r"[a-z0-9]+")


def rouge_l_f1(candidate: str, reference: str) -> float:
    c, r = _WORD.findall(candidate.lower()), _WORD.findall(reference.lower())
    if not c or not r:
        return 0.0
    prev = [0] * (len(r) + 1)
    for x in c:
        cur = [0]
        for j, y in enumerate(r):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(c), lcs / len(r)
    return 2 * p * rec / (p + rec)


def per_step(events, marks, rows, warmup: int) -> dict:
    """Seconds per step and per part from timed calls. ``events``: ``(end time, row, seconds)``; ``marks``: the
    step boundaries ``[t0, end of step 1, ..., end of step N]``. A call belongs to the step in whose interval it
    ended. Medians over the steps after ``warmup`` (all steps when there are no more); "other" is each step's time
    minus its timed parts."""
    steps = [b - a for a, b in zip(marks, marks[1:])]
    parts = {r: [0.0] * len(steps) for r in rows}
    for t, row, s in events:
        i = next((i for i, b in enumerate(marks[1:]) if t <= b), None)
        if i is not None and row in parts:
            parts[row][i] += s
    parts["other"] = [st - sum(parts[r][i] for r in rows) for i, st in enumerate(steps)]
    skip = warmup if len(steps) > warmup else 0
    return {"step_times_s": steps, "median_from_step": skip + 1, "step_s": statistics.median(steps[skip:]),
            "parts_s": {r: statistics.median(v[skip:]) for r, v in parts.items()},
            "parts_by_step_s": parts}


def run_worker(folder: str) -> dict:
    """In the subprocess: the OnlineDPOTrainer run of ``folder/spec.json`` on ``folder/model``."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    with open(os.path.join(folder, "spec.json")) as f:
        spec = json.load(f)
    cuda = torch.cuda.is_available()
    model_dir = os.path.join(folder, "model")
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    load_s = time.perf_counter() - t0
    rows = [{"prompt": [{"role": "user", "content": p["text"]}], "gold": p["gold"]}
            for step in spec["prompts_by_step"] for p in step[: spec["batch_size"]]]
    peft_config = None
    if spec["lora_rank"]:
        from peft import LoraConfig

        peft_config = LoraConfig(r=spec["lora_rank"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0,
                                 target_modules=[HF_TARGETS[t] for t in spec["lora_targets"]], task_type="CAUSAL_LM")

    def gold_rouge(prompts, completions, gold, **_):
        return [rouge_l_f1(c[0]["content"] if isinstance(c, list) else c, g) for c, g in zip(completions, gold)]

    args = OnlineDPOConfig(
        output_dir=os.path.join(folder, "trl_out"), report_to=[], save_strategy="no", logging_steps=1,
        disable_tqdm=True, use_cpu=not cuda, bf16=False, fp16=False, seed=spec["seed"], use_vllm=False,
        per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1, max_steps=spec["steps"],
        train_sampling_strategy="sequential", dataloader_num_workers=0,
        learning_rate=spec["learning_rate"], lr_scheduler_type=SCHEDULES[spec["lr_schedule"]], warmup_steps=0,
        weight_decay=spec["weight_decay"], adam_epsilon=spec["adam_eps"], max_grad_norm=spec["max_grad_norm"],
        beta=spec["beta"], loss_type=spec["loss_type"], max_new_tokens=spec["max_new_tokens"],
        max_length=spec["max_prompt_length"] + spec["max_new_tokens"], temperature=spec["temperature"],
        top_k=spec["top_k"], top_p=spec["top_p"], gradient_checkpointing=spec["remat"] != "none",
        generation_kwargs={"use_cache": True})

    events, marks, losses, lengths, seen, rss = [], [], [], [], [], {}
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def timed(row, fn, pick=None):
        def call(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            sync()
            end = time.perf_counter()
            events.append((end, pick() if pick else row, end - t))
            return out
        return call

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks.append(time.perf_counter())

        def on_pre_optimizer_step(self, *a, **k):
            sync()
            self.t = time.perf_counter()

        def on_optimizer_step(self, *a, **k):
            sync()
            events.append((time.perf_counter(), "optimizer", time.perf_counter() - self.t))

        def on_step_end(self, *a, **k):
            sync()
            marks.append(time.perf_counter())
            if len(marks) - 1 == spec["warmup"]:
                rss["until_warm"] = peak_rss()
                rss["reset"] = peak_rss_reset()

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    trainer = OnlineDPOTrainer(model=model, reward_funcs=gold_rouge, args=args, train_dataset=Dataset.from_list(rows),
                               processing_class=tok, peft_config=peft_config, callbacks=[Clock()])
    generate = trainer._generate

    def generate_and_count(model, prompts, *a, **k):
        out = generate(model, prompts, *a, **k)
        seen.append([p[-1]["content"] for p in prompts])
        lengths.append(out[3].sum(1).tolist())  # completion_mask after TRL's EOS truncation
        return out

    trainer._generate = timed("generate", generate_and_count)
    trainer._forward = timed(None, trainer._forward,
                             pick=lambda: "policy forward" if torch.is_grad_enabled() else "reference forward")
    trainer._calculate_rewards_from_functions = timed("reward", trainer._calculate_rewards_from_functions)
    trainer._clip_grad_norm = timed("grad clipping", trainer._clip_grad_norm)
    trainer.accelerator.backward = timed("backward", trainer.accelerator.backward)
    tok.batch_decode = timed("decoding to text", tok.batch_decode)
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    end_peak = peak_rss()
    res = per_step(events, marks, TRL_ROWS, spec["warmup"])
    whole = [v for v in (rss.get("until_warm"), end_peak) if v is not None]
    trained = [p for p in trainer.model.parameters() if p.requires_grad]
    device = f"torch {torch.__version__} {'cuda' if cuda else 'cpu'} ({torch.get_num_threads()} threads)"
    return {**res, "device": f"{device}, trl {trl.__version__}", "load_s": load_s, "train_s": train_s,
            "first_step_s": res["step_times_s"][0] if res["step_times_s"] else None,
            "peak_rss_mib": max(whole) / MiB if whole else None,
            "peak_rss_after_warmup_mib": end_peak / MiB if rss.get("reset") and end_peak else None,
            "losses": losses, "response_tokens": lengths,
            "same_prompts": seen == [[p["text"] for p in s[: spec["batch_size"]]] for s in spec["prompts_by_step"]],
            "trainable_M": sum(p.numel() for p in trained) / 1e6, "optim": getattr(args.optim, "value", args.optim),
            "gradient_checkpointing": args.gradient_checkpointing}


def run(folder: str) -> dict:
    """Run the worker on ``folder`` (``model/`` and ``spec.json``, written by ``online_loop.py``'s bpo_jax side)
    in a subprocess; return its figures (also left in ``folder/trl.json``)."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), folder], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
        sys.exit(f"the TRL side failed (exit {proc.returncode})")
    with open(os.path.join(folder, "trl.json")) as f:
        return json.load(f)


def main(argv=None) -> int:
    folder = (argv if argv is not None else sys.argv[1:])[0]
    res = run_worker(folder)
    with open(os.path.join(folder, "trl.json"), "w") as f:
        json.dump(res, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
