"""The GGUF tokenizer built from metadata (no torch) tokenizes, detokenizes and renders the chat template exactly
as transformers' own GGUF tokenizer (which needs torch: available here, in the test extras)."""

import json
import os

import pytest
from transformers import AutoTokenizer

from bpo_jax.models.gguf_tokenizer import tokenizer_from_gguf
from bpo_jax.models.loading import resolve
from testing import ROOT

TEXTS = ["Hello world 2024 12345 3.14", "  leading spaces\n\ttabs\r\nand\n\n\nnewlines  ", "don't you'll I'M we've",
         "émigré naïve 日本語 🤖 ½ ∑", "<|im_start|>user\nhi<|im_end|> <|endoftext|> <repo_name>x<filename>y", "",
         "a" * 300, "def f(x):\n    return {'k': [1, 2]}  # comment"]


@pytest.fixture(scope="module")
def both(smollm2):
    path = resolve("smollm2-135m-instruct")
    reference = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return smollm2[1], reference


def test_same_ids_and_text_as_transformers_gguf_tokenizer(both):
    ours, ref = both
    with open(os.path.join(ROOT, "data", "minisum", "train.jsonl")) as f:
        docs = [json.loads(line)["document"] for line in f][:40]
    assert len(ours) == len(ref) == 49152
    for text in TEXTS + docs:
        ids = ref(text)["input_ids"]
        assert ours(text)["input_ids"] == ids, text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text
    for name in ("bos_token", "eos_token", "unk_token", "pad_token", "chat_template"):
        assert getattr(ours, name) == getattr(ref, name), name
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sum 2 + 2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3?"}]
    for convo in (messages, messages[1:2]):
        render = dict(tokenize=True, add_generation_prompt=True, return_dict=True)
        assert (list(ours.apply_chat_template(convo, **render)["input_ids"])
                == list(ref.apply_chat_template(convo, **render)["input_ids"]))


def _fields(**over):
    base = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2", "tokenizer.ggml.tokens": [
        "<s>", "a", "b", "ab", "Ġ", "Ġab"], "tokenizer.ggml.merges": ["a b", "Ġ ab"],
        "tokenizer.ggml.token_type": [3, 1, 1, 1, 1, 1], "tokenizer.ggml.eos_token_id": 0}
    base.update(over)
    return lambda key, default=None: base.get(key, default)


def test_small_vocabulary_and_refusals():
    tok = tokenizer_from_gguf(_fields())
    assert tok("ab ab<s>")["input_ids"] == [3, 5, 0] and tok.eos_token == "<s>"
    assert tok.decode([3, 5, 0], skip_special_tokens=True) == "ab ab"
    with pytest.raises(ValueError, match="tokenizer model 'llama' is not supported"):
        tokenizer_from_gguf(_fields(**{"tokenizer.ggml.model": "llama"}))
    with pytest.raises(ValueError, match="pre-tokenizer 'qwen2' is not supported"):
        tokenizer_from_gguf(_fields(**{"tokenizer.ggml.pre": "qwen2"}))
    with pytest.raises(ValueError, match="no tokenizer.ggml.tokens"):
        tokenizer_from_gguf(_fields(**{"tokenizer.ggml.merges": []}))
