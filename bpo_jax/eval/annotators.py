"""Annotators: ``scores = annotator(prompts, responses)`` → one float per (prompt, response), higher is better.

BPO's annotation step ranks the two responses of a prompt by these scores. A prompt is a text or a conversation
(a list of ``{"role", "content"}`` messages ending with a user turn). ``FunctionAnnotator`` wraps any Python
reward function; ``RougeAnnotator`` is the CPU demo's gold reward (ROUGE-L F1 against a held-out expert summary
of each prompt's document); ``RewardModelAnnotator`` is the paper's annotator, a reward model.
"""

from __future__ import annotations

import re
from typing import Callable, Protocol, Sequence

import numpy as np

from bpo_jax.data.prompts import conversation
from bpo_jax.runtime import distributed


class Annotator(Protocol):
    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray: ...


class FunctionAnnotator:
    """Scores from ``fn(prompt, response) -> float`` (any Python reward function)."""

    def __init__(self, fn: Callable[[str, str], float]):
        self.fn = fn

    def __call__(self, prompts, responses) -> np.ndarray:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return np.asarray([float(self.fn(p, r)) for p, r in zip(prompts, responses)], np.float32)


_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_f1(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (Lin 2004) on lower-cased alphanumeric words: the longest common subsequence's harmonic mean
    of precision (vs the candidate's length) and recall (vs the reference's length)."""
    c, r = _words(candidate), _words(reference)
    if not c or not r:
        return 0.0
    lcs = _lcs(c, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(c), lcs / len(r)
    return 2 * p * rec / (p + rec)


class RougeAnnotator:
    """Gold reward for the demo: ROUGE-L F1 of a response against the held-out gold summary of its prompt.

    Not trivially gameable: F1 punishes both padding (precision falls) and truncation (recall falls), copying
    the document scores poorly against a one-sentence summary, and the gold summaries are never shown to the
    policy nor used as the reference the win rate compares against.
    """

    def __init__(self, gold_by_prompt: dict[str, str]):
        self.gold = dict(gold_by_prompt)

    def __call__(self, prompts, responses) -> np.ndarray:
        missing = [p for p in prompts if p not in self.gold]
        if missing:
            raise KeyError(f"no gold summary for prompt {missing[0][:80]!r}")
        return np.asarray([rouge_l_f1(r, self.gold[p]) for p, r in zip(prompts, responses)], np.float32)


def _hh_text(messages) -> str:
    """Chat messages as Anthropic-HH-style text: ``\n\nHuman: …\n\nAssistant: …``."""
    return "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages)


class RewardModelAnnotator:
    """Scores from a reward model (``bpo_jax.models.load_reward_model``) on its **own** tokenizer and chat
    template, so the RM need not share the policy's tokenizer.

    Each (prompt, response) becomes the conversation ``prompt turns + assistant: response``, rendered with the
    RM tokenizer's chat template (or, without one, HH-style ``Human: … Assistant: …`` text); a row longer than
    ``max_length`` keeps its last ``max_length`` tokens (the response end). A text-pair RM (``rm.text_pair``:
    DeBERTa, as the OpenAssistant RM's model card uses it) instead reads ``tokenizer(question, response)`` with
    its ``token_type_ids``, where the question is a one-turn prompt's text (a longer conversation: its HH-style
    text); a pair over ``max_length`` is cut by the tokenizer's ``longest_first`` truncation. Truncated rows are
    counted in ``truncated``. Rows are scored in fixed-size batches, right-padded to a multiple of 64 tokens, so
    the jitted scorer compiles once per length bucket. With several processes each host scores its own rows
    (``batch_size`` per host per call) and the hosts agree on each call's width; a row one host cannot encode
    stops every host with the same error.
    """

    def __init__(self, rm, tokenizer, *, batch_size: int = 16, max_length: int = 1024):
        if tokenizer is None:
            raise ValueError("the reward model folder has no tokenizer files; the annotator needs its tokenizer")
        self.rm, self.tokenizer, self.batch_size, self.max_length = rm, tokenizer, batch_size, max_length
        self.truncated = 0

    def encode(self, prompt, response: str) -> list[int]:
        """The token ids the RM scores for (prompt, response)."""
        return self.encode_row(prompt, response)[0]

    def encode_row(self, prompt, response: str) -> tuple[list[int], list[int]]:
        """``(input_ids, token_type_ids)`` of (prompt, response); the types are all 0 for a chat template."""
        if self.rm.text_pair:
            turns = conversation(prompt)
            question = turns[0]["content"] if len(turns) == 1 else _hh_text(turns)
            enc = self.tokenizer(question, response, return_token_type_ids=True)
            if len(enc["input_ids"]) > self.max_length:
                self.truncated += 1
                enc = self.tokenizer(question, response, return_token_type_ids=True, truncation="longest_first",
                                     max_length=self.max_length)
            return list(enc["input_ids"]), list(enc["token_type_ids"])
        messages = conversation(prompt) + [{"role": "assistant", "content": response}]
        if self.tokenizer.chat_template:
            ids = self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        else:
            ids = self.tokenizer(_hh_text(messages))["input_ids"]
        ids = list(ids)
        if len(ids) > self.max_length:
            self.truncated += 1
            ids = ids[-self.max_length:]
        return ids, [0] * len(ids)

    def __call__(self, prompts, responses) -> np.ndarray:
        encoded = distributed.agreed(self._encoded, prompts, responses)  # host-local: one outcome for every host
        scores = []
        for s in range(0, len(encoded), self.batch_size):
            chunk = encoded[s: s + self.batch_size]
            longest = distributed.max_over_hosts(max(len(e) for e, _ in chunk))  # one shape on every host
            width = min(-(-longest // 64) * 64, max(self.max_length, 1))
            ids = np.zeros((self.batch_size, width), np.int32)
            mask, types = np.zeros_like(ids), np.zeros_like(ids)
            mask[len(chunk):, 0] = 1  # filler rows: one token keeps them well-defined; dropped below
            for i, (e, t) in enumerate(chunk):
                ids[i, : len(e)] = e
                mask[i, : len(e)] = 1
                types[i, : len(t)] = t
            rows = self.rm(ids, mask, types) if self.rm.text_pair else self.rm(ids, mask)
            scores.append(rows[: len(chunk)])
        return np.concatenate(scores).astype(np.float32) if scores else np.zeros((0,), np.float32)

    def _encoded(self, prompts, responses) -> list[tuple[list[int], list[int]]]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return [self.encode_row(p, r) for p, r in zip(prompts, responses)]
