"""Reward models: scores match HF ``*ForSequenceClassification`` (PyTorch) whatever the padding; clear errors."""

import json

import numpy as np
import pytest
import torch

from bpo_jax.models import load_reward_model
from tiny_models import save_hf_reward_model

SEQS = [[5, 9, 17, 3, 44, 8], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [21, 99], [33]]


def _hf_score(model, seq):
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([seq])).logits[0, 0])


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma", "llama3_rope"])
def rm(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"rm_{request.param}")
    hf_model = save_hf_reward_model(request.param, path)
    return hf_model, *load_reward_model(str(path))


def _layout(seqs, split, width, left_pad):
    """Rows laid out as the online loop does: prompt (seq[:split]) left-padded to ``left_pad`` columns, then the
    response right-padded to ``width`` columns in all."""
    ids = np.zeros((len(seqs), width), np.int32)
    mask = np.zeros_like(ids)
    for i, s in enumerate(seqs):
        p, r = s[: min(split, len(s))], s[min(split, len(s)):]
        ids[i, left_pad - len(p): left_pad] = p
        mask[i, left_pad - len(p): left_pad] = 1
        ids[i, left_pad: left_pad + len(r)] = r
        mask[i, left_pad: left_pad + len(r)] = 1
    return ids, mask


@pytest.mark.slow
def test_scores_match_hf_for_any_padding(rm):
    hf_model, model, _ = rm
    want = np.array([_hf_score(hf_model, s) for s in SEQS])
    for split, left_pad, width in [(100, 10, 10), (0, 0, 12), (3, 5, 16), (2, 4, 13)]:
        ids, mask = _layout(SEQS, split, width, left_pad)
        got = np.asarray(model(ids, mask))
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=f"split={split} left_pad={left_pad}")


def test_batched_right_padding_matches_hf_batched(rm):
    hf_model, model, _ = rm
    ids, mask = _layout(SEQS, 0, 10, 0)  # right padding with pad id 0, where HF's own pooling is right
    with torch.no_grad():
        hf = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits[:, 0].numpy()
    np.testing.assert_allclose(np.asarray(model(ids, mask)), hf, atol=1e-4, rtol=1e-4)


def test_scores_differ_between_sequences(rm):
    _, model, _ = rm
    ids, mask = _layout(SEQS, 100, 10, 10)
    scores = np.asarray(model(ids, mask))
    assert scores.shape == (4,) and scores.dtype == np.float32 and np.ptp(scores) > 1e-3


def test_sharded_scores_equal_single_device(tmp_path):
    import jax

    from bpo_jax.runtime import sharding as shd

    save_hf_reward_model("llama", tmp_path)
    single, _ = load_reward_model(str(tmp_path))
    mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
    sharded, _ = load_reward_model(str(tmp_path), mesh=mesh)
    assert jax.device_count() == 8
    ids, mask = _layout(SEQS * 2, 3, 12, 5)
    np.testing.assert_allclose(np.asarray(sharded(ids, mask)), np.asarray(single(ids, mask)), atol=1e-5)


def test_errors_name_the_problem(tmp_path):
    path = tmp_path / "rm"
    save_hf_reward_model("llama", path)
    cfg = json.loads((path / "config.json").read_text())
    ids, mask = np.array([[1, 2]]), np.array([[0, 0]])
    model, _ = load_reward_model(str(path))
    with pytest.raises(ValueError, match="at least one real token"):
        model(ids, mask)
    (path / "config.json").write_text(json.dumps({**cfg, "id2label": {"0": "a", "1": "b"}, "num_labels": 2}))
    with pytest.raises(ValueError, match="num_labels=2"):
        load_reward_model(str(path))
    (path / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match="not a \\*ForSequenceClassification"):
        load_reward_model(str(path))


@pytest.fixture(scope="module")
def rm_with_tokenizer(tiny_policy_and_rm):
    """The shared tiny Llama RM with SmolLM2's tokenizer and chat template, in HF (PyTorch) and here."""
    from transformers import AutoModelForSequenceClassification

    path = tiny_policy_and_rm[1]
    hf = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    return hf, *load_reward_model(path)


def test_annotator_scores_text_with_the_rms_chat_template(rm_with_tokenizer):
    from bpo_jax.eval.annotators import RewardModelAnnotator

    hf, rm, tok = rm_with_tokenizer
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Name a fruit."}]
    prompts = ["Say something nice.", conv, "Summarise: the cat sat on the mat all day long."]
    responses = ["You are great.", "Apple.", "A cat sat."]
    annotator = RewardModelAnnotator(rm, tok, batch_size=2)
    got = annotator(prompts, responses)
    want = []
    for p, r in zip(prompts, responses):
        messages = ([{"role": "user", "content": p}] if isinstance(p, str) else conv) + [
            {"role": "assistant", "content": r}]
        ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        want.append(_hf_score(hf, list(ids)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # A row's score does not depend on what it is batched with.
    np.testing.assert_allclose(annotator(prompts[2:], responses[2:]), got[2:], atol=1e-5)
    assert annotator.truncated == 0


def test_annotator_keeps_the_response_end_when_truncating(rm_with_tokenizer):
    from bpo_jax.eval.annotators import RewardModelAnnotator

    _, rm, tok = rm_with_tokenizer
    short = RewardModelAnnotator(rm, tok, max_length=16)
    ids = short.encode("word " * 50, "The end.")
    assert len(ids) == 16 and short.truncated == 1
    assert ids == RewardModelAnnotator(rm, tok).encode("word " * 50, "The end.")[-16:]
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        short(["a", "b"], ["c"])
