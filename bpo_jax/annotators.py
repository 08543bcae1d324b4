"""Annotators: ``scores = annotator(prompts, responses)`` → one float per (prompt, response), higher is better.

BPO's annotation step ranks the two responses of a prompt by these scores. ``FunctionAnnotator`` wraps any
Python reward function; ``RougeAnnotator`` is the CPU demo's gold reward (ROUGE-L F1 against a held-out
expert summary of each prompt's document).
"""

from __future__ import annotations

import re
from typing import Callable, Protocol, Sequence

import numpy as np


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
