"""The public raw formats of the paper's tasks, parsed into one example layout.

Every task yields examples ``{"id", "roles", "contents", "reference"}``: the prompt as a chat conversation
(``roles[i]`` is ``user`` or ``assistant``; it always ends with a user turn) and the human reference response
that the win rate compares against.

- **Reddit TL;DR** (OpenAI's summarize-from-feedback ``tldr_3_filtered``: ``train.jsonl`` / ``valid.jsonl`` /
  ``test.jsonl``, rows ``{id, subreddit, title, post, summary}``): one user turn
  ``SUBREDDIT: r/… / TITLE: … / POST: … / TL;DR:``; the reference is ``summary``.
- **Anthropic HH** (``hh-rlhf``, ``helpful-base`` / ``harmless-base``: ``train.jsonl.gz`` / ``test.jsonl.gz``, rows
  ``{chosen, rejected}`` of ``\\n\\nHuman: …\\n\\nAssistant: …`` turns): split at the last assistant turn; the
  prompt is the dialogue before it and the reference is the chosen final answer (``hh_example``, Harmlessness:
  the official sft_harm_data keeps the whole dialogue too). Helpfulness keeps the first exchange only
  (``hh_first_turn_example``): the official sft_hh_data prompts are single human turns.

A malformed line raises ``ValueError`` naming the file and line; a missing field names the field.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from typing import Iterator

TLDR_FIELDS = ("subreddit", "title", "post", "summary")
_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def read_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of a ``.jsonl`` or ``.jsonl.gz`` file (a UTF-8 byte-order
    mark at its start, as Windows editors write one, is skipped)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{n}: not UTF-8 text (byte {err.start} of the line)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            yield n, row


def _field(row: dict, name: str, where: str) -> str:
    value = row.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: missing or empty field {name!r}")
    return value


def tldr_example(row: dict, where: str) -> dict:
    """One TL;DR row as an example; ``where`` (``file:line``) prefixes errors."""
    sub, title, post, summary = (_field(row, f, where) for f in TLDR_FIELDS)
    text = f"SUBREDDIT: r/{sub.strip()}\nTITLE: {title.strip()}\nPOST: {post.strip()}\nTL;DR:"
    ident = row.get("id") if isinstance(row.get("id"), str) else where
    return {"id": ident, "roles": ["user"], "contents": [text], "reference": summary.strip()}


def hh_turns(dialogue: str, where: str) -> list[tuple[str, str]]:
    """``[(role, text)]`` of an HH dialogue string; roles alternate starting with the user."""
    parts = _TURN.split(dialogue)
    if parts[0].strip() or len(parts) < 3:
        raise ValueError(f"{where}: a dialogue must start with '\\n\\nHuman: ' and alternate Human/Assistant turns")
    turns = [("user" if who == "Human" else "assistant", text.strip()) for who, text in zip(parts[1::2], parts[2::2])]
    for i, (role, _) in enumerate(turns):
        if role != ("user" if i % 2 == 0 else "assistant"):
            raise ValueError(f"{where}: turn {i + 1} should be {'Human' if i % 2 == 0 else 'Assistant'}; HH "
                             f"dialogues alternate Human/Assistant starting with Human")
    return turns


def hh_example(row: dict, where: str) -> dict:
    """One HH row as an example: the chosen dialogue split at its last assistant turn."""
    turns = hh_turns(_field(row, "chosen", where), where)
    if turns[-1][0] != "assistant" or not turns[-1][1]:
        raise ValueError(f"{where}: field 'chosen' must end with a non-empty Assistant turn")
    prompt = turns[:-1]
    return {"id": where.rsplit(os.sep, 1)[-1], "roles": [r for r, _ in prompt],
            "contents": [t for _, t in prompt], "reference": turns[-1][1]}


def hh_first_turn_example(row: dict, where: str) -> dict:
    """One HH row as a single-turn example: the chosen dialogue's first human turn, its first assistant reply as
    the reference; later turns are dropped, so every dialogue gives one prompt.

    As the official Helpfulness data: sft_hh_data's prompts are single human turns (``f"{instruction}
    Assistant: "``, util/extract_train_data.py, from HuggingFaceH4/helpful-anthropic-raw, whose 65,842
    instruction/demonstration pairs (its dataset card) are as many as hh-rlhf's helpful-base + helpful-online
    training dialogues, 43,835 + 22,007: one pair per dialogue, so its first exchange, not only the dialogues of
    one turn); none of the 21,000 sft_hh_data rows holds a second turn. Its length filter (prompts <= 64 Gemma
    tokens, labels <= 128) is not applied here: the prompt stream drops over-long prompts and the evaluation
    cuts them (``max_prompt_length``)."""
    turns = hh_turns(_field(row, "chosen", where), where)
    if len(turns) < 2 or not turns[0][1] or not turns[1][1]:
        raise ValueError(f"{where}: field 'chosen' must open with a non-empty Human turn and Assistant reply")
    return {"id": where.rsplit(os.sep, 1)[-1], "roles": ["user"], "contents": [turns[0][1]],
            "reference": turns[1][1]}


def find_file(folder: str, stem: str) -> str:
    """``folder/stem.jsonl`` or ``folder/stem.jsonl.gz``, whichever exists; else a FileNotFoundError saying where
    the raw files go."""
    for name in (f"{stem}.jsonl", f"{stem}.jsonl.gz"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no {stem}.jsonl or {stem}.jsonl.gz in {folder!r} (the task's manual_dir)")


def split_file(folder: str, split: str) -> str:
    """The file of ``split`` in ``folder``: ``test`` is ``test.jsonl[.gz]``; ``train`` (the prompts the online
    loop samples for) is the official layout's ``sampling.jsonl`` when there is one (its ``train.jsonl`` is the
    SFT data; online_dpo_rand_trainer.py:1252 reads sampling.jsonl), else ``train.jsonl[.gz]``."""
    if split == "train":
        try:
            return find_file(folder, "sampling")
        except FileNotFoundError:
            pass
    return find_file(folder, split)
