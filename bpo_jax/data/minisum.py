"""The CPU demo's task, *minisum*: one-sentence summaries of short documents (shipped in ``data/minisum``).

Each row has a ``document``, a plain human ``reference`` summary (what the policy must beat) and a held-out
expert ``gold`` summary (what the annotator scores against; the policy never sees it). The gold reward is
ROUGE-L F1 against ``gold`` (``bpo_jax.eval.annotators.RougeAnnotator``); the win rate is the fraction of test
documents where the policy's greedy summary scores higher than the human reference does.

A row may also carry a ``group`` (a string; minisum's: its template's name). Test prompts of one group tend to
win or lose together (minisum's eight templates), so the experiment report and ``compare`` add confidence
intervals that resample whole groups (``bpo_jax.eval.stats.paired_bootstrap``). A file gives a group to every
row or to none.
"""

from __future__ import annotations

import os

from bpo_jax.data.formats import read_jsonl
from bpo_jax.data.prompts import encode, left_pad

FIELDS = ("id", "document", "reference", "gold")
DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "data", "minisum")
INSTRUCTION = "Summarize the following text in one sentence.\n\n"


def load_rows(path: str) -> list[dict]:
    """Rows of a minisum JSONL file; a malformed line, a missing field, or a ``group`` that is empty or given to
    some rows only raises ValueError naming file and line."""
    rows, first = [], 0
    for n, row in read_jsonl(path):
        first = first or n
        for field in FIELDS + (("group",) if "group" in row else ()):
            if not isinstance(row.get(field), str) or not row[field].strip():
                raise ValueError(f"{path}:{n}: missing or empty field {field!r}")
        if rows and ("group" in row) != ("group" in rows[0]):
            raise ValueError(f"{path}:{n}: {'a' if 'group' in row else 'no'} 'group' field, unlike line {first}: give "
                             f"every row a group or none")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def groups(rows: list[dict]) -> list[str] | None:
    """The rows' ``group`` labels, or None when the file gives none (``load_rows`` checked: all or none)."""
    return [r["group"] for r in rows] if rows and "group" in rows[0] else None


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
