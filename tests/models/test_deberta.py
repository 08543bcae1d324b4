"""DeBERTa-v2/v3 reward models: scores match HF ``DebertaV2ForSequenceClassification`` (PyTorch) on padded
text pairs for several config variants, under any padding and sharding; the annotator reads text pairs; a tiny
train run uses one as its annotator; unsupported checkpoints fail with errors that name the problem."""

import json

import numpy as np
import pytest
import torch

from bpo_jax.models import load_reward_model
from testing import TINY_PAPER_RUN
from tiny_models import save_hf_deberta_reward_model

QUESTIONS = ["What is the cat?", "Explain nuclear fusion like I am five", "hi", "Is the mat a cat?"]
ANSWERS = ["The cat sat on the mat.", "The sun fuses atoms and that gives energy, a lot of energy, so much energy!",
           "ok", "no"]

VARIANTS = {
    # OpenAssistant reward-model-deberta-v3-large-v2's layout: log-bucketed relative positions, shared keys,
    # no absolute positions, no token types.
    "v3": {},
    # DeBERTa-v2 style: clipped (unbucketed) relative positions, separate position projections, absolute
    # positions, token types, an embedding projection, no relative-embedding LayerNorm.
    "v2_unbucketed": dict(position_buckets=-1, max_relative_positions=16, share_att_key=False, type_vocab_size=2,
                          position_biased_input=True, max_position_embeddings=128, embedding_size=24,
                          norm_rel_ebd="none", hidden_act="gelu_new"),
    # c2p only, separate key projection, token types; pooler tanh.
    "c2p_only": dict(pos_att_type=["c2p"], share_att_key=False, type_vocab_size=2, pooler_hidden_act="tanh"),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def rm(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"deberta_{request.param}")
    hf_model, _ = save_hf_deberta_reward_model(path, **VARIANTS[request.param])
    model, tok = load_reward_model(str(path))
    return hf_model, model, tok, path


def _hf_scores(hf_model, enc) -> np.ndarray:
    with torch.no_grad():
        return hf_model(**{k: torch.tensor(np.asarray(v)) for k, v in enc.items()}).logits[:, 0].numpy()


def test_scores_match_hf_on_padded_text_pairs(rm):
    hf_model, model, tok, _ = rm
    enc = tok(QUESTIONS, ANSWERS, padding=True, return_tensors="np")
    assert enc["attention_mask"].min() == 0 and enc["input_ids"].shape[1] > 16  # padded; past the buckets
    got = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    want = _hf_scores(hf_model, enc)
    assert got.shape == (4,) and got.dtype == np.float32 and np.ptp(want) > 1e-2
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_a_row_scores_the_same_padded_or_not(rm):
    hf_model, model, tok, _ = rm
    enc = tok(QUESTIONS, ANSWERS, padding=True, return_tensors="np")
    batched = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    for i in (1, 2):  # the longest row and a short one, alone: no padding at all
        one = tok(QUESTIONS[i], ANSWERS[i], return_tensors="np")
        alone = model(one["input_ids"], one["attention_mask"], one["token_type_ids"])
        np.testing.assert_allclose(alone, _hf_scores(hf_model, one), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(alone, batched[i: i + 1], atol=1e-5, rtol=1e-5)
    # Left padding and extra right padding (columns HF would count as positions) change nothing here.
    shifted = [np.zeros((4, enc["input_ids"].shape[1] + 7), np.int32) for _ in range(3)]
    for new, old in zip(shifted, (enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])):
        new[:, 3: 3 + old.shape[1]] = old
    np.testing.assert_allclose(model(*shifted), batched, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("buckets,max_position", [(8, 64), (256, 512), (16, 33)])
def test_log_buckets_equal_hf(buckets, max_position):
    from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

    from bpo_jax.models.deberta import DebertaConfig, log_bucket_table

    hf = {"model_type": "deberta-v2", "vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1,
          "num_attention_heads": 2, "intermediate_size": 8, "relative_attention": True,
          "position_buckets": buckets, "max_relative_positions": max_position}
    length = 3000
    got = log_bucket_table(DebertaConfig.from_hf(hf), length)
    want = make_log_bucket_position(torch.arange(-(length - 1), length), buckets, max_position).long().numpy()
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_sharded_scores_equal_single_device(tmp_path):
    import jax

    from bpo_jax.runtime import sharding as shd

    save_hf_deberta_reward_model(tmp_path, type_vocab_size=2)
    single, tok = load_reward_model(str(tmp_path))
    mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
    sharded, _ = load_reward_model(str(tmp_path), mesh=mesh)
    assert jax.device_count() == 8
    query = sharded.params["layers"]["query"]["kernel"]  # [layers, hidden, heads * head_dim]
    assert query.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    enc = tok(QUESTIONS * 2, ANSWERS[::-1] * 2, padding=True, return_tensors="np")
    rows = enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]
    np.testing.assert_allclose(sharded(*rows), single(*rows), atol=1e-5)
    np.testing.assert_allclose(sharded(*(r[:3] for r in rows)), single(*(r[:3] for r in rows)), atol=1e-5)


def test_bfloat16_compute_stays_close_to_float32(tmp_path):
    save_hf_deberta_reward_model(tmp_path)
    f32, tok = load_reward_model(str(tmp_path), dtype="float32")
    bf16, _ = load_reward_model(str(tmp_path), param_dtype="bfloat16", dtype="bfloat16")
    assert bf16.params["layers"]["query"]["kernel"].dtype == np.dtype("bfloat16")
    enc = tok(QUESTIONS, ANSWERS, padding=True, return_tensors="np")
    rows = enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]
    got, want = bf16(*rows), f32(*rows)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=5e-2)


def test_annotator_scores_text_pairs(rm):
    from bpo_jax.eval.annotators import RewardModelAnnotator

    hf_model, model, tok, _ = rm
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "What is the cat?"}]
    prompts = [*QUESTIONS[:3], conv]
    annotator = RewardModelAnnotator(model, tok, batch_size=3)
    questions = [*QUESTIONS[:3], "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: What is the cat?"]
    for p, q, a in zip(prompts, questions, ANSWERS):
        enc = tok(q, a)
        assert annotator.encode_row(p, a) == (enc["input_ids"], enc["token_type_ids"])
        assert annotator.encode(p, a) == enc["input_ids"]
    got = annotator(prompts, ANSWERS)
    want = [_hf_scores(hf_model, tok(q, a, return_tensors="np"))[0] for q, a in zip(questions, ANSWERS)]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(annotator(prompts[3:], ANSWERS[3:]), got[3:], atol=1e-5)
    assert annotator.truncated == 0


def test_annotator_truncates_long_pairs_with_the_tokenizer(rm):
    from bpo_jax.eval.annotators import RewardModelAnnotator

    _, model, tok, _ = rm
    short = RewardModelAnnotator(model, tok, max_length=12)
    ids, types = short.encode_row("the cat " * 30, "The end.")
    enc = tok("the cat " * 30, "The end.", truncation="longest_first", max_length=12)
    assert (ids, types) == (enc["input_ids"], enc["token_type_ids"]) and len(ids) == 12 and short.truncated == 1
    assert np.isfinite(short(["the cat " * 30], ["The end."])).all()


@pytest.mark.slow
def test_paper_config_runs_with_a_deberta_reward_model(tiny_policy_and_rm, tmp_path):
    """The TL;DR paper config (its reward model is the paper's DeBERTa-v3 RM) runs two BPO steps on the shipped
    samples with the tiny DeBERTa RM as ``reward_model``, then evaluates."""
    from bpo_jax.__main__ import main as cli

    rm_dir = tmp_path / "deberta_rm"
    save_hf_deberta_reward_model(rm_dir)
    run = tmp_path / "run"
    assert cli(["train", "--config", "configs/tldr_gemma2b.yaml", f"model={tiny_policy_and_rm[0]}",
                f"reward_model={rm_dir}", f"run_dir={run}", f"tfds_dir={tmp_path / 'tfds'}", *TINY_PAPER_RUN]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    evals = [r for r in records if "eval/win_rate" in r]
    assert evals and all(0.0 <= r["eval/win_rate"] <= 1.0 and np.isfinite(r["eval/mean_score"]) for r in evals)


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **changes}))
    return cfg


def test_errors_name_the_problem(tmp_path):
    from safetensors.numpy import load_file, save_file

    path = tmp_path / "rm"
    save_hf_deberta_reward_model(path, type_vocab_size=2)
    model, _ = load_reward_model(str(path))
    with pytest.raises(ValueError, match="at least one real token"):
        model(np.array([[1, 2]]), np.array([[0, 0]]))
    with pytest.raises(ValueError, match="type_vocab_size=2"):
        model(np.array([[1, 2]]), np.array([[1, 1]]), np.array([[0, 2]]))
    cfg = _edit_config(path, num_labels=2, id2label={"0": "a", "1": "b"})
    with pytest.raises(ValueError, match="num_labels=2"):
        load_reward_model(str(path))
    for key, value in [("conv_kernel_size", 3), ("pos_att_type", ["p2p", "c2p"]), ("norm_rel_ebd", "batch_norm"),
                       ("hidden_act", "mish"), ("pooler_hidden_size", 16)]:
        (path / "config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(ValueError, match=key):
            load_reward_model(str(path))
    (path / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(path / "model.safetensors")
    name = "deberta.encoder.layer.1.attention.self.query_proj.weight"
    save_file({**tensors, name: tensors[name][:, :16]}, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"tensor '{name}' has shape \\(32, 16\\), expected \\(32, 32\\)"):
        load_reward_model(str(path))
    save_file({k: v for k, v in tensors.items() if k != "classifier.bias"}, path / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing tensor 'classifier.bias'"):
        load_reward_model(str(path))
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    _edit_config(path, position_biased_input=True, max_position_embeddings=8)
    save_file({**tensors, "deberta.embeddings.position_embeddings.weight": np.zeros((8, 32), np.float32)},
              path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="over max_position_embeddings=8"):
        load_reward_model(str(path))[0](np.ones((1, 9)), np.ones((1, 9)))
