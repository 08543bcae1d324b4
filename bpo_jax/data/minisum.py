"""The CPU demo's task, *minisum*: one-sentence summaries of short documents (shipped in ``data/minisum``).

Each row has a ``document``, a plain human ``reference`` summary (what the policy must beat) and a held-out
expert ``gold`` summary (what the annotator scores against; the policy never sees it). The gold reward is
ROUGE-L F1 against ``gold`` (``bpo_jax.eval.annotators.RougeAnnotator``); the win rate is the fraction of test
documents where the policy's greedy summary scores higher than the human reference does.
"""

from __future__ import annotations

import os

from bpo_jax.data.formats import read_jsonl
from bpo_jax.data.prompts import encode, left_pad

FIELDS = ("id", "document", "reference", "gold")
DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "data", "minisum")
INSTRUCTION = "Summarize the following text in one sentence.\n\n"


def load_rows(path: str) -> list[dict]:
    """Rows of a minisum JSONL file; a malformed line or missing field raises ValueError naming file and line."""
    rows = []
    for n, row in read_jsonl(path):
        for field in FIELDS:
            if not isinstance(row.get(field), str) or not row[field].strip():
                raise ValueError(f"{path}:{n}: missing or empty field {field!r}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def prompt_text(row: dict) -> str:
    return INSTRUCTION + row["document"]


def encode_prompts(tokenizer, texts, max_len: int):
    """Left-padded ``(ids, mask)`` int32 ``[B, P]`` of chat-templated prompts, P = the longest prompt; a prompt
    longer than ``max_len`` tokens raises ValueError (the demo filters its data to fit)."""
    encoded = [encode(tokenizer, t) for t in texts]
    for t, e in zip(texts, encoded):
        if len(e) > max_len:
            raise ValueError(f"prompt of {len(e)} tokens exceeds max_prompt_length={max_len}: {t[:60]!r}…")
    return left_pad(encoded)
