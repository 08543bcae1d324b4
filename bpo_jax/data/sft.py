"""Supervised fine-tuning data: (prompt, response) rows from the official files, a minisum-format folder or a tfds
task, tokenized into the fixed-width layout the SFT step trains on (``bpo_jax.train.sft_step``).

Sources (``sft_rows``):

- ``sft_data`` = a folder of official ``{"prompt", "label"}`` rows (the official repo's ``sft_<task>_data``):
  ``train.jsonl`` trains and ``dev.jsonl`` is held out (``test.jsonl`` when there is no ``dev.jsonl``), as the
  official ``train/sft_train.py`` (lines 167-171) reads them. The prompt is plain text, tokenized without the chat
  template (``PlainText``), and the text trained on is ``prompt + label`` (``formatting_prompts_general_func``,
  line 22). The official Helpfulness formatting adds a second `` Assistant: `` after a prompt that already ends
  with one (``formatting_prompts_hh_func``, line 34-35); bpo_jax keeps the prompt as the file has it.
- empty ``sft_data``: the run's task (``data``): a minisum-format folder's ``train.jsonl`` documents with their
  human ``reference`` (held out: ``test.jsonl``), or a tfds task's train split with its references (held out: its
  test split), each prompt rendered as the online loop renders it.

Layout (``encode_rows``): ``ids``, ``mask`` int32 ``[M, P + N]``: the prompt left-padded to P slots, then the
response right-padded to N slots; the response is ``tokenizer(label)`` without special tokens plus EOS (TRL's
``ConstantLengthDataset`` ends every example with EOS), cut to ``max_new_tokens``. P and N are the longest
prompt and response over both splits, so one program serves every batch. Rows whose prompt is longer than
``max_prompt_length`` are dropped, and counted.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from bpo_jax.data import minisum
from bpo_jax.data.formats import read_jsonl
from bpo_jax.data.official import OFFICIAL_KEYS
from bpo_jax.data.prompts import PlainText, encode, example_prompt, example_reference, left_pad

HELD_OUT = ("dev.jsonl", "test.jsonl")  # the official folder's held-out file, in order of preference


class SftRows(NamedTuple):
    train: list  # (prompt, response text): the prompt a PlainText, a text or a conversation
    heldout: list
    source: str  # where they came from, for the run's first line


class SftArrays(NamedTuple):
    ids: np.ndarray  # int32 [M, P + N]
    mask: np.ndarray  # int32 [M, P + N], 1 on real prompt and response tokens
    prompt_len: int  # P


def official_rows(path: str) -> list:
    """``(PlainText(prompt), label)`` for each official row of the file at ``path``; a row without a non-empty
    ``prompt`` and ``label`` is a ValueError naming the file and line."""
    rows = []
    for n, row in read_jsonl(path):
        for key in OFFICIAL_KEYS:
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise ValueError(f"{path}:{n}: an SFT row needs non-empty {' and '.join(OFFICIAL_KEYS)} fields; "
                                 f"missing or empty {key!r}")
        rows.append((PlainText(row["prompt"]), row["label"]))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def sft_rows(cfg, sources: dict | None = None) -> SftRows:
    """The run's SFT rows (see the module docstring). ``sources``: a tfds task's prepared splits
    (``bpo_jax.wiring.tasks.prepare_tfds``), needed when ``sft_data`` is empty and ``data`` is a tfds task."""
    if cfg.sft_data:
        if not os.path.isdir(cfg.sft_data):
            raise ValueError(f"sft_data={cfg.sft_data!r} is not a folder (it holds train.jsonl and dev.jsonl or "
                             f"test.jsonl of official {{prompt, label}} rows)")
        held = [os.path.join(cfg.sft_data, f) for f in HELD_OUT if os.path.isfile(os.path.join(cfg.sft_data, f))]
        if not held:
            raise ValueError(f"sft_data={cfg.sft_data!r} has no held-out file ({' or '.join(HELD_OUT)})")
        return SftRows(official_rows(os.path.join(cfg.sft_data, "train.jsonl")), official_rows(held[0]),
                       f"{cfg.sft_data} (held out: {os.path.basename(held[0])})")
    if sources is not None:
        from bpo_jax.data.builders import split_examples

        train, test = (split_examples(sources[s]) for s in ("train", "test"))
        return SftRows([(example_prompt(ex), example_reference(ex)) for ex in train],
                       [(example_prompt(ex), example_reference(ex)) for ex in test], f"task {cfg.data}")
    folder = minisum.DATA_DIR if cfg.data == "minisum" else cfg.data
    train, test = (minisum.load_rows(os.path.join(folder, f"{s}.jsonl")) for s in ("train", "test"))
    return SftRows([(minisum.prompt_text(r), r["reference"]) for r in train],
                   [(minisum.prompt_text(r), r["reference"]) for r in test], f"{folder} (human references)")


def encode_rows(tokenizer, splits, *, eos_id: int, max_prompt_length: int, max_response_length: int):
    """``([SftArrays per split], dropped per split)``: each split's rows as ``[prompt | response]`` of one shared
    width (the module docstring's layout); rows whose prompt is over ``max_prompt_length`` tokens are dropped. A
    split left empty is a ValueError."""
    encoded, dropped = [], []
    for rows in splits:
        pairs = [(encode(tokenizer, p), _response_ids(tokenizer, r, eos_id)[:max_response_length]) for p, r in rows]
        kept = [(p, r) for p, r in pairs if len(p) <= max_prompt_length]
        if not kept:
            raise ValueError(f"no SFT row's prompt fits max_prompt_length={max_prompt_length} tokens; raise it")
        encoded.append(kept)
        dropped.append(len(pairs) - len(kept))
    width_p = max(len(p) for kept in encoded for p, _ in kept)
    width_n = max(len(r) for kept in encoded for _, r in kept)
    out = []
    for kept in encoded:
        p_ids, p_mask = left_pad([p for p, _ in kept], width_p)
        r_ids, r_mask = left_pad([r[::-1] for _, r in kept], width_n)  # right-padded: left-pad the reversed rows
        out.append(SftArrays(np.concatenate([p_ids, r_ids[:, ::-1]], 1), np.concatenate([p_mask, r_mask[:, ::-1]], 1),
                             width_p))
    return out, dropped


def _response_ids(tokenizer, text: str, eos_id: int) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [int(eos_id)]
