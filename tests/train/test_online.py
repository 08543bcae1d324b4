"""The online loop end to end on a tiny random model: phases, log 2 at phase starts, exact kill-and-resume,
SIGTERM checkpoints, NaN halts, and clear config errors from the CLI."""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from bpo_jax.__main__ import main as cli
from bpo_jax.config import TrainConfig
from bpo_jax.data.minisum import encode_prompts
from bpo_jax.data.prompts import ArrayPrompts
from bpo_jax.eval.annotators import FunctionAnnotator
from bpo_jax.models import load_pretrained
from bpo_jax.train import loop
from bpo_jax.wiring.tasks import training_run
from testing import TESTS, write_minisum_folder

TEXTS = [f"Tell me about topic number {i}, briefly." for i in range(12)]
LOG2 = float(np.log(2.0))


@pytest.fixture(scope="module")
def tiny_dir(tiny_policy_and_rm):
    """A tiny random Llama with SmolLM2's tokenizer (vocab 49152), saved as an HF folder."""
    return tiny_policy_and_rm[0]


def _setup(tiny_dir):
    model, tok = load_pretrained(tiny_dir)
    ids, mask = encode_prompts(tok, TEXTS, 64)
    return model, tok, ArrayPrompts(TEXTS, ids, mask, batch_size=2, seed=3)


def _annotator():
    return FunctionAnnotator(lambda prompt, response: response.count("e") - 0.01 * len(response))


def _cfg(run_dir, **kw):
    base = dict(total_steps=4, num_phases=2, batch_size=2, max_new_tokens=6, learning_rate=5e-3,
                run_dir=str(run_dir), seed=3)
    return TrainConfig(**{**base, **kw})


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.mark.slow
def test_two_phase_run_logs_log2_at_each_phase_start(tiny_dir, tmp_path, caplog):
    model, tok, prompts = _setup(tiny_dir)
    cfg = _cfg(tmp_path / "run", behavior_check_every=1)  # the sampler's re-score at every phase start too
    with caplog.at_level(logging.WARNING, logger="bpo_jax"):
        state = loop.train(cfg, training_run(model, tok, prompts, _annotator(), eos_token_ids=(2,)))
    assert "log-probs of the same responses differ" not in caplog.text  # the gaps are rounding: no warning
    assert int(state.step) == 4 and int(state.phase) == 1
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and [r["phase"] for r in records] == [1, 1, 2, 2]
    for r in (records[0], records[2]):  # π_θ = π_β at each phase start under reference=behavior
        np.testing.assert_allclose(r["loss"], LOG2, atol=1e-5)
        assert r["phase/behavior_logp_gap"] < 1e-3
        assert 0 <= r["phase/policy_behavior_logp_gap_mean"] <= r["phase/policy_behavior_logp_gap"] < 1e-3
    assert abs(records[1]["loss"] - LOG2) > 1e-4
    logged = {"kl_policy_behavior", "grad_norm", "learning_rate", "truncation_rate", "rewards/accuracies"}
    assert logged <= set(records[0])
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2", "4"]


@pytest.mark.slow
def test_a_behavior_that_is_not_the_policy_is_warned_at_each_phase_start(tiny_dir, tmp_path, monkeypatch, caplog):
    """π_β sampling with other weights than the policy's (here its final norm scaled by 1.05, as a wrong merge or
    a model that computes differently would): the phase-start gap exceeds rounding and the loop says so, naming
    the check; π_β's own re-score agrees with its sampler, so that check stays quiet."""
    model, tok, prompts = _setup(tiny_dir)
    real = loop.st.behavior_params

    def skewed(cfg, state, dtype=None):
        params = real(cfg, state, dtype)
        return {**params, "final_norm": params["final_norm"] * 1.05}

    monkeypatch.setattr(loop.st, "behavior_params", skewed)
    with caplog.at_level(logging.WARNING, logger="bpo_jax"):
        loop.train(_cfg(tmp_path / "run", behavior_check_every=1),
                   training_run(model, tok, prompts, _annotator(), eos_token_ids=(2,)))
    warned = [r.getMessage() for r in caplog.records if "log-probs of the same responses differ" in r.getMessage()]
    assert [w.split(":")[0] for w in warned] == ["phase 1", "phase 2"]
    assert all("the policy's forward" in w and "phase/policy_behavior_logp_gap" in w for w in warned)
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        starts = [r for r in map(json.loads, f) if r.get("phase_start")]
    assert all(r["phase/policy_behavior_logp_gap"] > 7e-5 > r["phase/behavior_logp_gap"] for r in starts)


COMPILED = "/jax/core/compile/backend_compile_duration"


@pytest.mark.slow
def test_on_policy_run_compiles_nothing_after_its_second_phase(tiny_dir, tmp_path, monkeypatch):
    """F = T = 5 with a 2-member ensemble: XLA compiles in phase 1, only π_β ← π_θ (``sync_behavior``) in phase 2,
    and nothing after (the fresh state is committed like the step's outputs, so π_β reaches the sampler with the
    same jit signature in every phase). The π_θ-vs-π_β gaps come from the step at every phase start; the
    sampler's own re-score runs at phases 1, 3, 5 (``behavior_check_every=2``) and hits its cache at 3 and 5."""
    import jax

    compiles, per_phase = [], {}
    start_phase = loop._start_phase

    def counted(cfg, run, state, phase, stop):
        per_phase[phase] = len(compiles)
        return start_phase(cfg, run, state, phase, stop)

    def listener(event, secs, **kw):
        if event == COMPILED:
            compiles.append(event)

    monkeypatch.setattr(loop, "_start_phase", counted)
    model, tok, prompts = _setup(tiny_dir)
    cfg = _cfg(tmp_path / "run", total_steps=5, num_phases=5, lora_rank=2, ensemble_size=2, behavior_check_every=2)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        loop.train(cfg, training_run(model, tok, prompts, _annotator(), eos_token_ids=(2,)))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    counts = [b - a for a, b in zip([per_phase[p] for p in range(5)], [*[per_phase[p] for p in range(1, 5)],
                                                                        len(compiles)])]
    assert counts[0] >= 1 and counts[1] <= 1 and counts[2:] == [0, 0, 0], counts  # caches may be warm
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert all(r["phase/policy_behavior_logp_gap"] < 1e-3 and "phase/member_logp_gap_max" in r for r in records)
    assert ["phase/behavior_logp_gap" in r for r in records] == [True, False, True, False, True]


@pytest.mark.slow
def test_sampling_several_batches_per_call_collects_the_same_phase(tiny_dir, monkeypatch):
    """``sampling_batch_size`` = 3 batches: one generate call of 6 prompts collects the 3-step phase's 6 pairs
    (instead of three calls of 2) from the same prompts in the same order; the stream is left where it would be."""
    from bpo_jax.sample import sampler

    model, tok, _ = _setup(tiny_dir)
    calls = []
    real = sampler.generate
    monkeypatch.setattr(loop, "generate", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    got = {}
    for sbs in (0, 6):
        prompts = ArrayPrompts(TEXTS, *encode_prompts(tok, TEXTS, 64), batch_size=2, seed=3)
        cfg = _cfg("unused", total_steps=3, num_phases=1, sampling_batch_size=sbs, temperature=2.0)
        calls.clear()
        pairs, stats = loop.collect_pairs(cfg, training_run(model, tok, prompts, _annotator(), eos_token_ids=(2,)),
                                          model.params, loop.jax.random.key(0))
        got[sbs] = (pairs, stats, list(calls), prompts.get_state())
    (p0, s0, c0, st0), (p6, s6, c6, st6) = got[0], got[6]
    assert c6[0] == 6 and len(c6) <= len(c0) and c0[0] == 2
    assert len(p6["chosen_ids"]) == len(p0["chosen_ids"]) == 6
    fresh = ArrayPrompts(TEXTS, *encode_prompts(tok, TEXTS, 64), batch_size=2, seed=3)
    prompt_of = lambda p: [tuple(r) for r in p["chosen_ids"][:, :fresh.width]]  # noqa: E731  (left-padded prompts)
    it = iter([tuple(fresh.ids[i]) for i in fresh.take(0, s6["prompts_sampled"])])
    assert all(p in it for p in prompt_of(p6))  # the pairs' prompts: the stream's, in its order
    dropped = {k: s["identical_pairs_dropped"] + s["tied_pairs_dropped"] for k, s in ((0, s0), (6, s6))}
    assert s6["prompts_sampled"] <= 6 + 2 * dropped[6]  # no batch beyond what is missing
    if dropped[0] == dropped[6] == 0:  # nothing dropped: the same prompts
        assert prompt_of(p6) == prompt_of(p0) and st0 == st6


def test_tied_pairs_label_the_second_sample_or_are_dropped():
    """``build_pairs``: the higher score is chosen and a tie labels the second sample (the official rule);
    ``tied`` marks the ties that ``tied_pairs=drop`` removes."""
    from bpo_jax.train.pairs import build_pairs, tied

    tokens = np.arange(8 * 3).reshape(8, 3)
    scores = np.asarray([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.0, 0.0])
    pairs = build_pairs(np.zeros((4, 2), int), np.ones((4, 2), int), tokens, np.ones((8, 3), int),
                        np.zeros((8, 3)), scores, np.ones(4, bool))
    np.testing.assert_array_equal(pairs["chosen_ids"][:, 2:], tokens[[0, 3, 5, 7]])  # ties: rows 5 and 7
    np.testing.assert_array_equal(pairs["rejected_ids"][:, 2:], tokens[[1, 2, 4, 6]])
    np.testing.assert_array_equal(tied(scores), [False, False, True, True])


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["drop", "second"])
def test_collection_drops_and_counts_tied_pairs(tiny_dir, rule):
    """An annotator that ties most pairs: ``drop`` samples on until the phase has K·B pairs that all carry a
    preference and counts the ties it dropped; ``second`` keeps them (counted, none dropped)."""
    model, tok, prompts = _setup(tiny_dir)
    cfg = _cfg("unused", total_steps=2, num_phases=1, temperature=2.0, tied_pairs=rule)
    coarse = FunctionAnnotator(lambda prompt, response: float(len(response) % 3 == 0))  # ties 5 times in 9
    pairs, stats = loop.collect_pairs(cfg, training_run(model, tok, prompts, coarse, eos_token_ids=(2,)),
                                      model.params, loop.jax.random.key(0))
    assert len(pairs["chosen_ids"]) == 4 and stats["tied_pairs"] > 0
    decided = pairs["chosen_scores"] != pairs["rejected_scores"]
    if rule == "drop":
        assert decided.all() and stats["tied_pairs_dropped"] == stats["tied_pairs"]
        assert stats["prompts_sampled"] >= 4 + stats["tied_pairs_dropped"]
    else:
        assert stats["tied_pairs_dropped"] == 0 and not decided.all()


@pytest.mark.slow
def test_ensemble_members_differ_from_the_merged_behavior_at_a_phase_start(tiny_dir, tmp_path):
    """With 3 adapters π_β is their merge: at phase 2's start the sampler matches π_β, but every member is
    away from it, so the first loss of the phase is not log 2 (it is with one adapter, above)."""
    model, tok, prompts = _setup(tiny_dir)
    loop.train(_cfg(tmp_path / "run", lora_rank=2, ensemble_size=3, behavior_check_every=1),
               training_run(model, tok, prompts, _annotator(), eos_token_ids=(2,)))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    first, second = records[0], records[2]
    assert first["phase/member_logp_gap_max"] < 1e-3 and abs(first["loss"] - LOG2) < 1e-5  # B = 0: all = base
    assert second["phase/behavior_logp_gap"] < 1e-3 < second["phase/member_logp_gap_max"]
    assert second["phase/policy_behavior_logp_gap"] < 1e-3  # the merged ensemble, as the step runs it, is π_β
    assert abs(second["loss"] - LOG2) > 1e-5


_KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    sys.path[:0] = [{here!r}, {tests!r}]
    from test_online import _annotator, _cfg, _setup
    from bpo_jax.wiring.tasks import training_run
    from bpo_jax.train import loop
    model, tok, prompts = _setup({tiny!r})
    def die(params, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return {{}}
    loop.train(_cfg({run!r}, checkpoint_every=1, eval_every=1),
               training_run(model, tok, prompts, _annotator(), eos_token_ids=(2,)), evaluate=die)
""")


@pytest.mark.slow
def test_sigkill_and_resume_gives_identical_losses(tiny_dir, tmp_path):
    model, tok, prompts = _setup(tiny_dir)
    parts = training_run(model, tok, prompts, _annotator(), eos_token_ids=(2,))
    loop.train(_cfg(tmp_path / "whole", checkpoint_every=1), parts)
    want = _losses(tmp_path / "whole")

    run = str(tmp_path / "killed")
    script = _KILLED_RUN.format(here=os.path.dirname(os.path.abspath(__file__)), tests=TESTS, tiny=tiny_dir, run=run)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert sorted(_losses(run)) == [1, 2]  # died during step 3, after the step-2 checkpoint
    loop.train(_cfg(run, checkpoint_every=1), parts)  # the same command on the same run_dir resumes
    got = _losses(run)
    assert sorted(got) == [1, 2, 3, 4]
    np.testing.assert_allclose([got[s] for s in range(1, 5)], [want[s] for s in range(1, 5)], rtol=1e-6)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_then_exits(tiny_dir, tmp_path):
    model, tok, prompts = _setup(tiny_dir)

    def preempt(params, step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return {}

    with pytest.raises(loop.Preempted, match="saved a checkpoint at step 1"):
        loop.train(_cfg(tmp_path / "run", eval_every=1), training_run(model, tok, prompts, _annotator(),
                                                                      eos_token_ids=(2,)), evaluate=preempt)
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["1"]
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is back


@pytest.mark.slow
def test_nan_loss_halts_and_keeps_the_last_good_checkpoint(tiny_dir, tmp_path, monkeypatch):
    model, tok, prompts = _setup(tiny_dir)
    real = loop.make_train_step

    def poisoned(*args, **kwargs):
        step_fn = real(*args, **kwargs)

        def step(state, batch):
            new_state, metrics = step_fn(state, batch)
            if int(new_state.step) == 3:
                metrics = {**metrics, "loss": metrics["loss"] * np.nan}
            return new_state, metrics

        return step

    monkeypatch.setattr(loop, "make_train_step", poisoned)
    with pytest.raises(FloatingPointError, match="loss is nan at step 3"):
        loop.train(_cfg(tmp_path / "run"), training_run(model, tok, prompts, _annotator(), eos_token_ids=(2,)))
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["2"]
    assert sorted(_losses(tmp_path / "run")) == [1, 2]


@pytest.mark.slow
def test_train_command_end_to_end(tiny_dir, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    write_minisum_folder(data)
    run = tmp_path / "run"
    assert cli(["train", f"model={tiny_dir}", f"data={data}", f"run_dir={run}", "total_steps=2", "num_phases=2",
                "batch_size=2", "max_new_tokens=4", "eval_max_new_tokens=4", "lora_rank=2", "learning_rate=0.05",
                "eval_sft_logratio=true", "tied_pairs=second"]) == 0
    out = capsys.readouterr().out
    assert "win rate vs human references" in out and "before ->" in out
    with open(run / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [0, 1, 2, 2] and records[-1]["final"] is True
    assert (run / "plot.png").read_bytes()[:4] == b"\x89PNG"
    with open(run / "eval_step2_data.jsonl") as f:  # the final model's per-prompt scores, as `evaluate` writes
        rows = [json.loads(line) for line in f]
    assert len(rows) == 6 and {"prompt", "response", "reference", "score", "reference_score"} <= set(rows[0])
    wins = np.mean([r["score"] > r["reference_score"] for r in rows])
    assert wins == pytest.approx(records[-1]["eval/win_rate"])
    # Drift from the SFT model: 0 for the SFT model itself (up to the sampler's float rounding), then not.
    assert abs(records[0]["eval/sft_logratio"]) < 1e-3 < abs(records[-1]["eval/sft_logratio"])
    assert np.mean([r["sft_logratio"] for r in rows]) == pytest.approx(records[-1]["eval/sft_logratio"])
    # The greedy responses cut off at eval_max_new_tokens: each row says, and the rate is their mean.
    assert all(isinstance(r["truncated"], bool) for r in rows)
    assert np.mean([r["truncated"] for r in rows]) == pytest.approx(records[-1]["eval/truncation_rate"])
    assert 0 <= records[0]["eval/truncation_rate"] <= 1
    # Distinct greedy responses and the most common one's share, from the same responses.
    texts = [r["response"] for r in rows]
    assert records[-1]["eval/distinct_rate"] == pytest.approx(len(set(texts)) / 6)
    assert records[-1]["eval/top_response_share"] == pytest.approx(max(map(texts.count, texts)) / 6)
    exported, _ = load_pretrained(str(run / "policy"))  # the trained policy as an HF folder
    assert exported.config.num_layers == 2


@pytest.mark.parametrize("args, message", [
    (["totl_steps=4"], "unknown config key 'totl_steps' in the command line; did you mean total_steps"),
    (["total_steps=5", "num_phases=2"], "must be a multiple of num_phases"),
    (["reference=best"], "reference='best'; valid: behavior, sft, ema, mixup, fixed"),
    (["beta=-1"], "beta must be a finite number > 0"),
    (["ensemble_size=5"], "needs LoRA"),
    (["lora_targets=q,qkv"], "unknown LoRA target 'qkv'"),
    (["batch_size=three"], "batch_size='three' is not a valid int"),
    (["--config", "configs/nope.yaml"], "config file 'configs/nope.yaml' does not exist"),
    (["sampling_batch_size=12"], "sampling_batch_size=12 must be a multiple of batch_size=8"),
    (["remat=some"], "remat='some'; valid: none, full, dots"),
    (["lora_rank=4", "ensemble_size=2", "lora_init_from=/a"],
     "lora_init_from names 1 adapter folders; it needs one per"),
])
def test_bad_configs_fail_before_any_compute(args, message, capsys):
    assert cli(["train", *args]) == 2
    assert message in capsys.readouterr().err


def test_prompt_stream_epochs_are_seeded_permutations():
    def make(seed):
        return ArrayPrompts(list("abcdefg"), np.zeros((7, 2)), np.zeros((7, 2)), batch_size=3, seed=seed)

    p = make(1)
    stream = np.concatenate([p.take(i, 3) for i in range(0, 21, 3)])
    np.testing.assert_array_equal(stream, p.take(0, 21))  # resuming at any position continues the stream
    for epoch in range(3):
        assert sorted(stream[7 * epoch: 7 * epoch + 7]) == list(range(7))
    assert not np.array_equal(stream[:7], stream[7:14]) and not np.array_equal(stream, make(2).take(0, 21))
    batches = [p.next_batch().prompts for _ in range(3)]
    assert sum(batches, []) == ["abcdefg"[i] for i in stream[:9]]
    resumed = make(1)
    resumed.set_state({"position": 3})
    assert resumed.next_batch().prompts == batches[1]


def test_array_prompts_hosts_split_each_global_batch():
    """Each host takes the rows of every global batch that its batch shards own (contiguous or not): together the
    hosts draw exactly the single-process stream, so a global batch is the same whatever the process count."""
    texts = list("abcdefghij")
    ids = np.zeros((10, 2))
    for layout in ([[0, 1], [2, 3]], [[0, 2], [1, 3]]):
        single = ArrayPrompts(texts, ids, ids, batch_size=4, seed=5)
        hosts = [ArrayPrompts(texts, ids, ids, batch_size=4, seed=5, rows=rows) for rows in layout]
        for _ in range(5):
            whole = single.next_batch().prompts
            parts = [h.next_batch().prompts for h in hosts]
            assert [whole[i] for i in layout[0]] == parts[0] and [whole[i] for i in layout[1]] == parts[1]
        assert hosts[0].get_state() == hosts[1].get_state() == single.get_state()
    with pytest.raises(ValueError, match="not positions in a batch of 4"):
        ArrayPrompts(texts, ids, ids, batch_size=4, seed=5, rows=[3, 4])
