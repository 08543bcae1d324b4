"""Prompt data in TRL's dataset formats, stored as parquet (a Hub dataset's files, or a local folder of them).

A file's format comes from its columns, as TRL names them (other columns, such as ``prompt_id`` or scores, are
ignored):

- **prompt-only** (``prompt``): training prompts only; a test split needs references, so it is refused there;
- **prompt-completion** (``prompt``, ``completion``): the completion is the reference;
- **preference** (``prompt``, ``chosen``, ``rejected``): the chosen response is the reference.

Each value is *standard* (a string) or *conversational* (a list of ``{"role", "content"}`` messages), row by row.
As TRL renders them, a standard prompt is tokenized as it is (``render="plain"``, ``bpo_jax.data.prompts.
PlainText``) and a conversational one through the policy's chat template (``render="chat"``; it must end with a
user turn). A conversational reference is the content of its last message, an assistant turn (so a ``chosen``
that repeats the prompt's turns, as in ``HuggingFaceH4/ultrafeedback_binarized``, gives its final answer).

Splits are found by file name, as ``datasets.push_to_hub`` and the Hub's parquet conversion lay them out: the
files of split ``s`` are ``s.parquet``, ``s-*.parquet`` (``data/train-00000-of-00002.parquet``) or the parquet
files in a folder named ``s``, at any depth, in path order. A single parquet file given as the data is the
training split, its test split the files of that name beside it.

Every example is ``{"id", "roles", "contents", "reference", "render"}`` (``bpo_jax.data.builders``' layout).
Errors are one line naming the file (and row, 1-based, where a row is at fault).
"""

from __future__ import annotations

import os
import re
from typing import Iterator

PARQUET = ".parquet"
FORMATS = {"preference": ("prompt", "chosen", "rejected"), "prompt-completion": ("prompt", "completion"),
           "prompt-only": ("prompt",)}
REFERENCE = {"preference": "chosen", "prompt-completion": "completion", "prompt-only": None}
_TRL_COLUMNS = {"prompt", "completion", "chosen", "rejected", "label"}
ROLES = ("system", "user", "assistant")


def is_parquet_data(path: str) -> bool:
    """Whether ``path`` is a parquet file or a folder holding one (at any depth)."""
    if os.path.isfile(path):
        return path.endswith(PARQUET)
    return any(f.endswith(PARQUET) for _, _, files in os.walk(path) for f in files)


def split_files(path: str, split: str, *, train: bool = False) -> list[str]:
    """The parquet files of ``split`` under the folder ``path`` (module docstring), in path order; ``path`` a
    single file: itself when ``train``, else the split's files beside it. A split with no file is a
    FileNotFoundError naming the folder and the parquet files it has."""
    if os.path.isfile(path):
        if train:
            return [path]
        path = os.path.dirname(path)
    found = sorted(os.path.join(root, f) for root, _, files in os.walk(path) for f in files
                   if f.endswith(PARQUET) and _in_split(os.path.relpath(os.path.join(root, f), path), split))
    if not found:
        have = sorted(os.path.relpath(os.path.join(root, f), path) for root, _, files in os.walk(path)
                      for f in files if f.endswith(PARQUET))
        shown = ", ".join(have[:6]) + (f", ... ({len(have) - 6} more)" if len(have) > 6 else "")
        raise FileNotFoundError(f"no {split!r} split in {path} (a {split}.parquet, {split}-*.parquet or {split}/ "
                                f"file; set split=TRAIN,TEST); its parquet files: {shown or 'none'}")
    return found


def _in_split(relpath: str, split: str) -> bool:
    *folders, name = relpath.split(os.sep)
    stem = name[: -len(PARQUET)]
    return split in folders or stem == split or re.match(rf"{re.escape(split)}-\d", stem) is not None


def columns(path: str) -> list[str]:
    """The column names of the parquet file at ``path`` (a ValueError naming it when it is no parquet file)."""
    import pyarrow.parquet as pq

    try:
        return list(pq.ParquetFile(path).schema_arrow.names)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError variants for a damaged or foreign file
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{path}: not a readable parquet file ({first})") from None


def file_format(path: str, *, test: bool = False) -> str:
    """``preference``, ``prompt-completion`` or ``prompt-only``: the TRL format the file's columns form. Columns
    that form none (say ``chosen`` without ``rejected``, or no ``prompt``), or prompt-only rows in a ``test``
    split (no reference), are a ValueError naming the file and the columns it has."""
    have = columns(path)
    trl = _TRL_COLUMNS.intersection(have)
    kind = next((k for k, cols in FORMATS.items() if trl == set(cols)), None)
    listing = ", ".join(have) or "none"
    if kind is None:
        raise ValueError(f"{path}: its columns ({listing}) form none of TRL's formats: prompt-only (prompt), "
                         f"prompt-completion (prompt, completion), preference (prompt, chosen, rejected)")
    if test and REFERENCE[kind] is None:
        raise ValueError(f"{path}: a test split needs references (a completion or chosen column) for the win rate; "
                         f"its columns: {listing}")
    return kind


def parse_file(path: str, *, test: bool = False) -> Iterator[tuple[int, dict]]:
    """``(row, example)`` for each row of the parquet file at ``path`` (1-based rows), in its format
    (``file_format``); a row with a missing or malformed value is a ValueError naming the file, row and column."""
    import pyarrow.parquet as pq

    kind = file_format(path, test=test)
    wanted = list(FORMATS[kind][:1]) + ([REFERENCE[kind]] if REFERENCE[kind] else [])
    n = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=wanted):
        for row in batch.to_pylist():
            n += 1
            yield n, trl_example(kind, row, f"{path}:{n}")


def trl_example(kind: str, row: dict, where: str) -> dict:
    """One row of TRL format ``kind`` as an example; ``where`` (``file:row``) prefixes errors."""
    prompt = row.get("prompt")
    ident = where.rsplit(os.sep, 1)[-1]
    reference = _reference(row.get(REFERENCE[kind]), REFERENCE[kind], where) if REFERENCE[kind] else ""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"{where}: empty 'prompt'")
        return {"id": ident, "roles": ["user"], "contents": [prompt], "reference": reference, "render": "plain"}
    messages = _messages(prompt, "prompt", where)
    if messages[-1]["role"] != "user":
        raise ValueError(f"{where}: a conversational 'prompt' must end with a user turn; its last is "
                         f"{messages[-1]['role']!r}")
    return {"id": ident, "roles": [m["role"] for m in messages], "contents": [m["content"] for m in messages],
            "reference": reference, "render": "chat"}


def _reference(value, column: str, where: str) -> str:
    """A reference column's text: the string, or the content of a conversation's last (assistant) message."""
    if isinstance(value, str):
        return value
    messages = _messages(value, column, where)
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: a conversational {column!r} must end with an assistant turn; its last is "
                         f"{messages[-1]['role']!r}")
    return messages[-1]["content"]


def _messages(value, column: str, where: str) -> list[dict]:
    """A conversational value checked: a non-empty list of ``{"role", "content"}`` with known roles and text."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: {column!r} must be a string or a non-empty list of {{role, content}} messages, "
                         f"got {type(value).__name__}")
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise ValueError(f"{where}: message {i + 1} of {column!r} is not {{role: {'|'.join(ROLES)}, content: "
                             f"text}}: {repr(m)[:80]}")
    return [{"role": m["role"], "content": m["content"]} for m in value]
