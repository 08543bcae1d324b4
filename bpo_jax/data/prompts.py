"""Prompt streams for the online loop: endless, seeded, resumable batches of left-padded prompts.

A stream has ``batch_size`` (prompts per global batch), ``local_batch_size`` (this host's share of each global
batch: ``batch_size / shard_count`` with several processes), ``width`` (the fixed prompt width P, so the train
step compiles once),
``next_batch() -> PromptBatch`` and ``get_state()`` / ``set_state(state)`` (a small JSON-able dict that the
checkpoint stores, so a resumed run continues the same stream).

- ``ArrayPrompts``: prompts already encoded in memory (the CPU demo, tests); one seeded permutation per epoch.
  Every host walks the same global stream and takes its own slice of each global batch, so the global batches
  are the same whatever the number of processes.
- ``GrainPrompts``: a ``grain`` pipeline over a tfds data source (``bpo_jax.data.builders``): slice per host,
  seeded shuffle (a fresh one each epoch), tokenize (``encode``: the chat template, or plain text for an
  official row), drop prompts longer than
  ``max_prompt_length``, batch this host's share; its position is grain's iterator state (one per host).
"""

from __future__ import annotations

import re
from typing import NamedTuple, Sequence

import grain
import numpy as np


class PromptBatch(NamedTuple):
    prompts: list  # what the annotator sees: a text, or a conversation [{"role", "content"}, ...] per row
    ids: np.ndarray  # int32 [B, P], left-padded
    mask: np.ndarray  # int32 [B, P]


class PlainText(str):
    """A prompt that is tokenized as it is, without the chat template: an official BPO row's prompt, which the
    official trainer tokenizes with the plain tokenizer (its BOS, no template; online_dpo_rand_trainer.py:660 and
    1012). Everything else (annotators, logs) sees an ordinary string."""


def conversation(prompt) -> list[dict]:
    """A prompt as chat messages: a text becomes one user turn."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def encode(tokenizer, prompt) -> list[int]:
    """Token ids of a prompt ready for the reply: a ``PlainText`` as the tokenizer encodes the text (with its
    special tokens, e.g. Gemma's BOS), any other text or conversation under the tokenizer's chat template."""
    if isinstance(prompt, PlainText):
        return list(tokenizer(str(prompt))["input_ids"])
    return list(tokenizer.apply_chat_template(conversation(prompt), tokenize=True, add_generation_prompt=True,
                                              return_dict=True)["input_ids"])


KEEP = ("start", "end")
_PLAIN_USER_TURN = re.compile(r"(?:^|(?<= ))user: ")  # where a user turn starts in an official flattened dialogue


def encode_truncated(tokenizer, prompt, max_len: int, keep: str = "start") -> tuple[list[int], bool]:
    """``(ids, truncated)``: ``encode(prompt)`` cut to at most ``max_len`` tokens (unchanged when it fits).

    ``keep="start"`` (a document, e.g. a TL;DR post) keeps the longest start whose encoding fits, as the official
    evaluation does (the tokenizer's default right-side truncation, online_dpo_rand_trainer.py:1012), except that
    a chat template's generation prompt is kept: the text is cut at the end of the conversation, later turns first
    (a ``PlainText`` has none, so its cut start loses the trailing ``TL;DR: `` cue, exactly as officially).
    ``keep="end"`` (a dialogue) keeps its end, so the last user turn and the assistant cue survive: whole earlier
    turns are dropped from the start (the rest starts at a user turn), and only when the last user turn alone
    does not fit is the start of that turn cut, to the longest end that fits. The official code keeps the start
    for every task; for a dialogue that would lose the very question the reply must answer."""
    if keep not in KEEP:
        raise ValueError(f"keep={keep!r}; valid: {', '.join(KEEP)}")
    ids = encode(tokenizer, prompt)
    if len(ids) <= max_len:
        return ids, False
    messages = prompt if isinstance(prompt, PlainText) else conversation(prompt)
    pieces = _starts(messages) if keep == "start" else _ends(messages)
    return encode(tokenizer, _longest_fitting(tokenizer, pieces, max_len)), True


def _longest_fitting(tokenizer, pieces: list, max_len: int):
    """The last of ``pieces`` (ordered shortest first, their lengths about monotone) whose encoding fits."""
    if len(encode(tokenizer, pieces[0])) > max_len:
        raise ValueError(f"max_prompt_length={max_len} is shorter than the chat template's own tokens")
    lo, hi = 0, len(pieces)  # pieces[lo] fits; the answer lies in [lo, hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if len(encode(tokenizer, pieces[mid])) <= max_len else (lo, mid)
    return pieces[lo]


def _starts(prompt) -> "_Lazy":
    """Every start of a prompt (a ``PlainText`` or a conversation) by characters, shortest first."""
    if isinstance(prompt, PlainText):
        return _Lazy(len(prompt) + 1, lambda n: PlainText(prompt[:n]))
    lengths = [len(m["content"]) for m in prompt]

    def cut(chars: int) -> list[dict]:
        out = []
        for m, n in zip(prompt, lengths):
            out.append({**m, "content": m["content"][:max(chars, 0)]})
            chars -= n
            if chars <= 0:
                break
        return out

    return _Lazy(sum(lengths) + 1, cut)


def _ends(prompt) -> "_Lazy":
    """The ends of a dialogue that start at a user turn (or inside the last one), shortest first: the last user
    turn cut from its start by characters, then with whole earlier turns back to the first. A ``PlainText`` is an
    official flattened dialogue, whose user turns start at ``user: ``; with none, the whole text is one turn."""
    if isinstance(prompt, PlainText):
        starts = [m.start() for m in _PLAIN_USER_TURN.finditer(prompt)]
        starts = starts if starts and starts[0] == 0 else [0] + starts
        last, size = starts[-1], len(prompt)
        earlier = [PlainText(prompt[i:]) for i in reversed(starts[:-1])]
        return _Lazy(size - last + 1 + len(earlier),
                     lambda n: PlainText(prompt[size - n:]) if n <= size - last else earlier[n - (size - last) - 1])
    users = [i for i, m in enumerate(prompt) if m["role"] == "user"]
    if not users:
        raise ValueError("a dialogue prompt to cut from its end has no user turn")
    turn, tail = prompt[users[-1]], prompt[users[-1] + 1:]
    size = len(turn["content"])
    earlier = [prompt[i:] for i in reversed(users[:-1])]

    def cut(n: int) -> list[dict]:
        if n > size:
            return earlier[n - size - 1]
        return [{**turn, "content": turn["content"][size - n:]}] + tail

    return _Lazy(size + 1 + len(earlier), cut)


class _Lazy:
    """The sequence ``make(0), …, make(n - 1)``, made on indexing."""

    def __init__(self, n: int, make):
        self.n, self.make = n, make

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.make(i)


def left_pad(encoded: Sequence[Sequence[int]], width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ``(ids, mask)`` int32 ``[B, width]`` (default width: the longest row)."""
    width = max(len(e) for e in encoded) if width is None else width
    ids = np.zeros((len(encoded), width), np.int32)
    mask = np.zeros((len(encoded), width), np.int32)
    for i, e in enumerate(encoded):
        if len(e) > width:
            raise ValueError(f"a prompt of {len(e)} tokens does not fit width {width}")
        if len(e):
            ids[i, width - len(e):] = e
            mask[i, width - len(e):] = 1
    return ids, mask


class ArrayPrompts:
    """In-memory prompts ``[M, P]``; prompt ``position`` of the endless stream is drawn from a fresh seeded
    permutation of all M prompts per epoch. ``rows``: the positions of each global batch this host owns
    (``distributed.host_batch_rows``: the rows of its batch shards on the mesh); default: all of them."""

    def __init__(self, prompts: list, ids: np.ndarray, mask: np.ndarray, *, batch_size: int, seed: int,
                 rows=None):
        if not len(prompts) == len(ids) == len(mask):
            raise ValueError(f"{len(prompts)} prompts but {len(ids)} id rows and {len(mask)} mask rows")
        self.prompts, self.ids, self.mask = list(prompts), np.asarray(ids), np.asarray(mask)
        self.batch_size, self.seed, self.width = batch_size, seed, self.ids.shape[1]
        self._rows = np.arange(batch_size) if rows is None else np.asarray(rows, np.int64)
        if self._rows.size == 0 or self._rows.min() < 0 or self._rows.max() >= batch_size:
            raise ValueError(f"rows {self._rows.tolist()} are not positions in a batch of {batch_size}")
        self.local_batch_size = len(self._rows)
        self.position = 0

    def take(self, position: int, n: int) -> np.ndarray:
        """Indices of stream positions ``position … position + n − 1``."""
        m = len(self.prompts)
        steps = np.arange(position, position + n)
        perms = {e: np.random.default_rng([self.seed, e]).permutation(m) for e in np.unique(steps // m)}
        return np.asarray([perms[p // m][p % m] for p in steps])

    def next_batch(self) -> PromptBatch:
        idx = self.take(self.position, self.batch_size)[self._rows]
        self.position += self.batch_size
        return PromptBatch([self.prompts[i] for i in idx], self.ids[idx], self.mask[idx])

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.position = int(state["position"])


class GrainPrompts:
    """Training prompts from a random-access source of examples (``{"roles", "contents", ...}``, e.g. a tfds
    ``data_source`` split) as a grain pipeline; ``shard_index``/``shard_count`` give each host its own slice."""

    def __init__(self, source, tokenizer, *, batch_size: int, max_prompt_length: int, seed: int,
                 shard_index: int = 0, shard_count: int = 1):
        self.batch_size, self.seed, self.width = batch_size, seed, max_prompt_length
        self.local_batch_size = _share(batch_size, shard_count)
        self._tokenizer = tokenizer
        shard = grain.MapDataset.source(source)[shard_index::shard_count]
        if len(shard) == 0:
            raise ValueError(f"no training prompts in shard {shard_index} of {shard_count}")
        probe = min(len(shard), 64)
        if not any(len(self._encode(shard[i])["ids"]) <= max_prompt_length for i in range(probe)):
            raise ValueError(f"none of the first {probe} training prompts fits max_prompt_length="
                             f"{max_prompt_length} tokens (as encoded: chat template or plain text); raise it")
        ds = (shard.shuffle(seed=seed).repeat().map(self._encode)
              .filter(lambda ex: len(ex["ids"]) <= max_prompt_length))
        self._dataset = ds.to_iter_dataset().batch(self.local_batch_size, batch_fn=self._collate)
        self._iterator = iter(self._dataset)

    def _encode(self, example) -> dict:
        prompt = example_prompt(example)
        return {"prompt": prompt, "ids": encode(self._tokenizer, prompt)}

    def _collate(self, rows) -> PromptBatch:
        ids, mask = left_pad([r["ids"] for r in rows], self.width)
        return PromptBatch([r["prompt"] for r in rows], ids, mask)

    def next_batch(self) -> PromptBatch:
        return next(self._iterator)

    def get_state(self) -> dict:
        return dict(self._iterator.get_state())

    def set_state(self, state: dict) -> None:
        self._iterator = iter(self._dataset)
        self._iterator.set_state(dict(state))


def _share(batch_size: int, shard_count: int) -> int:
    if batch_size % shard_count:
        raise ValueError(f"a batch of {batch_size} prompts does not split over {shard_count} hosts")
    return batch_size // shard_count


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def example_conversation(example) -> list[dict]:
    """A stored example's prompt as chat messages (tfds returns text as bytes)."""
    return [{"role": _text(r), "content": _text(c)} for r, c in zip(example["roles"], example["contents"])]


def example_prompt(example):
    """A stored example's prompt as it is rendered: a ``PlainText`` (an official row, ``render="plain"``: the
    text as is) or chat messages (``render="chat"``, or an example without the field)."""
    if _text(example.get("render", "chat")) == "plain":
        return PlainText(_text(example["contents"][0]))
    return example_conversation(example)


def example_reference(example) -> str:
    return _text(example["reference"])
