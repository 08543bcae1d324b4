"""The benchmark scripts ``bench/train_step.py``, ``bench/online_loop.py`` and ``bench/xla_cpu.py`` run end to
end at tiny shapes and report sensible figures (their ``--json``). Each runs as a subprocess with an explicit
environment: one CPU device (the suite's ``--xla_force_host_platform_device_count=8`` is stripped: the benches
measure one device, as ``python -m bpo_jax train`` sees this machine), the HF hub offline."""

import json
import math
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TINY = ["--pairs", "2", "--prompt-len", "8", "--response-len", "8", "--repeats", "1"]


def _env():
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env.update(XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    return env


def _run(script, args, tmp_path, timeout=600):
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "bench", script), *args, "--json", str(out)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def _positive(*values):
    return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


def _check_row(r):
    assert _positive(r["step_s"], r["tokens_per_s"], r["first_call_s"], r["peak_rss_mib"])
    assert len(r["step_times_s"]) == 1 and math.isfinite(r["loss"])


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tiny_models import save_hf_model

    folder = tmp_path_factory.mktemp("tiny_llama")
    save_hf_model("llama", folder)
    return folder


@pytest.mark.slow
def test_train_step_lora_behavior_remat_chunked(tiny_llama, tmp_path):
    """A tiny Llama's shapes from its config.json (random weights), LoRA, reference = behavior (no reference
    forward), full rematerialisation, log-probs unembedded 4 positions at a time. (The shipped SmolLM2 runs the
    same code, only slower to compile.)"""
    res, out = _run("train_step.py", ["--model", str(tiny_llama), "--random", *TINY, "--lora-rank", "4",
                                      "--reference", "behavior", "--remat", "full", "--logprob-chunk", "4",
                                      "--profile", str(tmp_path / "trace")], tmp_path)
    assert "by op kind:" in out and "top 25 ops:" in out  # bench/profile_ops.py's table of the traced step
    assert re.search(r"^\s+[\d.]+ ms\s+\d+\s+\S+", out.split("top 25 ops:")[1], re.M)  # at least one op
    ours = res["bpo_jax"]
    _check_row(ours)
    assert ours["model_config"]["layers"] == 2 and ours["model_config"]["remat"] == "full"
    assert 0 < ours["trainable_M"] < ours["params_M"]
    assert _positive(ours["compiled_temp_mib"], ours["compiled_args_out_mib"])
    assert ours["tokens_per_step"] == 2 * 2 * 16
    assert ours["mfu"] is None and ours["model_flops"]["reference"] == 0  # CPU: no MFU; behavior: no ref forward
    assert "trl" not in res and "bpo_jax  " in out and "tokens/s" in out


@pytest.mark.slow
def test_train_step_full_finetuning_matches_trl_on_a_tiny_model(tiny_llama, tmp_path):
    """Full fine-tuning against the SFT reference on a tiny Llama folder: after the same two AdamW steps on the same
    weights and batch, bpo_jax and TRL report the same loss (the peer computes what we compute). Also the MFU
    path (``--peak-tflops`` on the CPU) and the FLOP count's reference forward."""
    pytest.importorskip("trl")
    res, out = _run("train_step.py", ["--model", str(tiny_llama), "--random", *TINY, "--reference", "sft",
                                      "--peer", "trl", "--peak-tflops", "1"], tmp_path)
    ours, trl = res["bpo_jax"], res["trl"]
    _check_row(ours)
    _check_row(trl)
    assert ours["trainable_M"] == ours["params_M"] == trl["trainable_M"]
    assert abs(ours["loss"] - trl["loss"]) < 1e-3 * max(1.0, abs(trl["loss"]))
    f = ours["model_flops"]
    assert f["reference"] > 0 and f["total"] == f["policy"] + f["reference"]
    assert 0 < ours["mfu"] < 1 and "MFU" in out
    assert _positive(res["ratio"]["step_time"], res["ratio"]["peak_rss"]) and "bpo_jax / trl: step time" in out


@pytest.mark.slow
def test_online_loop_one_phase(tiny_policy_and_rm, tmp_path):
    """One phase of the demo task's loop (minisum, ROUGE annotator) on a tiny random Llama with SmolLM2's tokenizer
    (the shipped SmolLM2 runs the same code, only slower to compile)."""
    res, out = _run("online_loop.py", ["--steps", "2", f"model={tiny_policy_and_rm[0]}", "batch_size=2",
                                       "eval_size=2", "max_new_tokens=8", "eval_max_new_tokens=8",
                                       "tied_pairs=second"], tmp_path)
    rows = res["rows"]
    for name in ("sampling", "decoding to text", "annotation", "train steps", "behavior sync", "checkpointing",
                 "eval: generate", "eval: scoring"):
        assert rows[name]["calls"] >= 1, name
    assert rows["train steps"]["calls"] == 2 and rows["train steps"]["rest_median_s"] > 0
    assert rows["sampling"]["total_s"] > 0 and rows["eval: generate"]["total_s"] > 0
    assert set(res["categories"]) >= {"sampling", "decoding", "annotation", "training", "behavior sync",
                                      "checkpointing", "evaluation"}
    assert abs(sum(r["total_s"] for r in rows.values()) - res["phase_s"]) < 1e-3
    assert len(res["losses"]) == 2 and 0 <= res["eval"]["eval/win_rate"] <= 1
    assert "phase total" in out and not os.path.exists(res["run_dir"])


def test_trl_online_reward_is_the_minisum_gold_reward(monkeypatch):
    """``bench/trl_online.py``'s ROUGE-L F1 (a copy, so the torch process loads no JAX) equals the annotator's."""
    import importlib
    import random

    from bpo_jax.eval.annotators import rouge_l_f1

    monkeypatch.syspath_prepend(os.path.join(REPO, "bench"))
    trl_online = importlib.import_module("trl_online")
    words = ["the", "The", "park", "opened,", "town", "7", "a.m.", "benches", "on", "Monday", "", "—", "new"]
    rng = random.Random(0)
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 12))) for _ in range(200)]
    for a, b in zip(texts, texts[1:] + texts[:1]):
        assert trl_online.rouge_l_f1(a, b) == rouge_l_f1(a, b), (a, b)


def test_grid_power_groups_hold_the_false_positive_rate(monkeypatch):
    """``bench/grid_power.py`` on simulated grids of 400 prompts x 3 seeds in 8 groups whose offsets spread the
    difference by 8.5 points (minisum's templates) and no true difference: the CI that resamples single prompts
    excludes 0 in far more than 5% of grids (21% over 200 grids when measured), the one that resamples groups in
    about 5%; with a true difference the group CI still finds it."""
    import importlib

    import numpy as np

    from bpo_jax.eval.stats import paired_bootstrap

    monkeypatch.syspath_prepend(os.path.join(REPO, "bench"))
    grid_power = importlib.import_module("grid_power")
    rng, labels, wrong = np.random.default_rng(0), np.arange(400) % 8, {"prompts": 0, "groups": 0}
    for g in range(60):
        a, b = grid_power.simulate(0.0, 0.1, 0.023, prompts=400, seeds=3, base_rate=0.67, rng=rng, groups=8,
                                   group_spread=0.085)
        for name, groups in (("prompts", None), ("groups", labels)):
            d = paired_bootstrap(a, b, groups=groups, num_bootstrap=500, seed=g)
            wrong[name] += d.ci_low > 0 or d.ci_high < 0
    assert wrong["prompts"] >= 6 and wrong["groups"] <= 6, wrong  # of 60: >= 10% and <= 10%
    assert grid_power.power(0.15, 0.2, 0.023, grids=10, prompts=400, seeds=3, base_rate=0.67, groups=8,
                            group_spread=0.085) >= 0.8


@pytest.mark.slow
def test_online_loop_peer_trl(tiny_policy_and_rm, tmp_path):
    """``--peer trl``: on-policy online DPO on both sides (a tiny random Llama with SmolLM2's tokenizer, 2 prompts x 2
    samples x 8 tokens, 3 steps): both report per-step times, their parts and peak RSS, TRL trains on bpo_jax's
    prompts, and the folder of both sides' files is removed."""
    pytest.importorskip("trl")
    res, out = _run("online_loop.py", ["--peer", "trl", "--steps", "3", f"model={tiny_policy_and_rm[0]}",
                                       "batch_size=2", "max_new_tokens=8", "tied_pairs=second"], tmp_path)
    ours, trl = res["bpo_jax"], res["trl"]
    for side in (ours, trl):
        assert len(side["step_times_s"]) == 3 and side["median_from_step"] == 3
        assert _positive(side["step_s"], side["first_step_s"], side["peak_rss_mib"], side["peak_rss_after_warmup_mib"])
        assert len(side["losses"]) == 3 and all(math.isfinite(v) for v in side["losses"])
        assert len(side["response_tokens"]) == 3 and all(len(call) == 4 for call in side["response_tokens"])
    assert all(ours["parts_s"][k] > 0 for k in ("sampling", "train steps", "checkpointing", "behavior merge"))
    assert all(trl["parts_s"][k] > 0 for k in ("generate", "policy forward", "reference forward", "backward",
                                                "optimizer"))
    assert ours["config"]["lora_rank"] == 16 and trl["gradient_checkpointing"]  # the demo's LoRA and remat=dots
    assert trl["same_prompts"] and 0 < trl["trainable_M"] < 1
    assert _positive(res["ratio"]["step_time"], res["ratio"]["peak_rss"])
    assert "bpo_jax / trl: s/step" in out and "not matched:" in out and "trl parts" in out
    assert not os.path.exists(res["exchange"])


@pytest.mark.slow
def test_xla_cpu_flags_reach_each_variants_own_process(tmp_path):
    """``bench/xla_cpu.py``: each variant runs in its own process (``XLA_FLAGS`` is read once), after a baseline run:
    the default sends the dot to YNNPACK (``ynn_fusion``), the ``eigen`` variant back to XLA's own ``dot``; the
    figures are positive and the f32 result is float32-exact against float64."""
    res, _ = _run("xla_cpu.py", ["--workloads", "matmul", "membw", "--variants", "eigen", "--rounds", "1",
                                 "--repeats", "1"], tmp_path)
    matmul = res["results"]["matmul"]
    assert set(matmul) == {"baseline", "eigen"} and res["variants"] == {"eigen": "--xla_cpu_experimental_ynn_"
                                                                                  "fusion_type=-individual_dot"}
    base, eigen = matmul["baseline"][0]["f32"], matmul["eigen"][0]["f32"]
    assert base["paths"] == {"ynn_fusion": 1, "dot": 0} and eigen["paths"] == {"dot": 1}
    assert _positive(base["gflops"], eigen["gflops"]) and base["rel_err"] < 1e-5 and eigen["rel_err"] < 1e-5
    assert _positive(res["results"]["membw"]["baseline"][0]["gb_s"])
