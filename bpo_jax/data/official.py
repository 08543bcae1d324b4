"""The official BPO data files as a format, and the per-file choice between it and the raw public formats.

The official code (github xu1998hz/BPO) ships its prompts as ``sft_<task>_data/{train,sampling,dev,test}.jsonl``
(``tldr``, ``hh``, ``harm``), one ``{"prompt": str, "label": str}`` row a line, built by
``util/extract_train_data.py``:

- **TL;DR** (``sft_tldr_data``): ``prompt`` is ``SUBREDDIT: r/…\\nTITLE: …\\nPOST: …\\nTL;DR: `` (CarperAI's
  ``openai_summarize_tldr`` prompt, kept when at most 512 Gemma tokens); ``label`` the human TL;DR.
- **Helpfulness** (``sft_hh_data``): ``prompt`` is one human turn followed by `` Assistant: `` (no ``Human:``
  prefix: ``f"{instruction} Assistant: "``, extract_train_data.py, from HuggingFaceH4/helpful-anthropic-raw's
  single-turn instruction/demonstration pairs, prompts of at most 64 tokens); ``label`` the demonstration.
- **Harmlessness** (``sft_harm_data``): the whole dialogue before the last assistant turn flattened into one
  string, ``user: … assistant: … user: … assistant: `` (turns ``f"{role}: {content}"`` joined by one space,
  then `` assistant: ``, extract_train_data.py, from HuggingFaceH4/hh-rlhf-h4, prompts of at most 256 tokens);
  ``label`` the chosen final answer.

The online loop samples for ``sampling.jsonl`` (online_dpo_rand_trainer.py:1252; ``train.jsonl`` is the SFT
data) and evaluates on ``test.jsonl`` (online_dpo_rand_trainer.py:1006). Its prompt is that string as is: the
trainer tokenizes ``item['prompt']`` with the plain Gemma tokenizer (BOS, no chat template; prompt_batchify and
``tokenizer(prompts, truncation=True, max_length=max_prompt_length)``, online_dpo_rand_trainer.py:644, 660 and
1012), and the reward model reads ``(prompt, label)`` / ``(prompt, response)`` pairs of the same string
(online_dpo_rand_trainer.py:1025). So an official row becomes an example with ``render="plain"``: one content,
the prompt verbatim, which ``bpo_jax.data.prompts`` tokenizes without the chat template. A raw row keeps
``render="chat"`` (its turns go through the policy tokenizer's chat template, as before).
"""

from __future__ import annotations

import os

FORMATS = ("auto", "official", "raw")  # the data_format key: per file from its first row, or forced
OFFICIAL_KEYS = ("prompt", "label")
# The fields that identify a raw row of each task (bpo_jax.data.formats).
RAW_KEYS = {"tldr": ("subreddit", "title", "post", "summary"), "hh_helpful": ("chosen",), "hh_harmless": ("chosen",)}
# What an official prompt of each task looks like: (how it starts, how it ends); "" = anything.
_SHAPES = {"tldr": ("SUBREDDIT: ", "TL;DR: "), "hh_helpful": ("", " Assistant: "),
           "hh_harmless": ("user: ", " assistant: ")}


def row_format(task: str, row: dict) -> str | None:
    """``"official"``, ``"raw"`` or None (neither shape) for one row of ``task``, from its keys."""
    if all(isinstance(row.get(k), str) for k in OFFICIAL_KEYS):
        return "official"
    if all(k in row for k in RAW_KEYS[task]):
        return "raw"
    return None


def neither_message(task: str, where: str, row: dict) -> str:
    return (f"{where}: neither an official BPO row (keys {', '.join(OFFICIAL_KEYS)}) nor a raw {task} row "
            f"(keys {', '.join(RAW_KEYS[task])}); its keys: {', '.join(sorted(row)) or 'none'}")


def official_example(task: str, row: dict, where: str) -> dict:
    """One official ``{"prompt", "label"}`` row of ``task`` as an example: the prompt verbatim (``render``
    ``plain``), the label as the reference. Errors name ``where`` (``file:line``) and what is off."""
    prompt, label = row.get("prompt"), row.get("label")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: missing or empty field 'prompt'")
    if not isinstance(label, str):  # may be empty: sft_harm_data/test.jsonl has two, and the official
        raise ValueError(f"{where}: missing field 'label'")  # evaluation scores them against "" all the same
    start, end = _SHAPES[task]
    if not prompt.startswith(start) or not prompt.endswith(end):
        raise ValueError(f"{where}: an official {task} prompt starts with {start!r} and ends with {end!r} "
                         f"(util/extract_train_data.py); this one starts {prompt[:20]!r} and ends {prompt[-20:]!r}")
    return {"id": where.rsplit(os.sep, 1)[-1], "roles": ["user"], "contents": [prompt], "reference": label,
            "render": "plain"}


def file_format(task: str, path: str, rows, forced: str = "auto") -> str:
    """The format of the file at ``path`` (``rows``: its ``(line, row)`` pairs): ``forced`` unless ``auto``,
    else the shape of its first row (a row of neither shape is a ValueError naming the file and line)."""
    if forced not in FORMATS:
        raise ValueError(f"data_format={forced!r}; valid: {', '.join(FORMATS)}")
    if forced != "auto":
        return forced
    for n, row in rows:
        found = row_format(task, row)
        if found is None:
            raise ValueError(neither_message(task, f"{path}:{n}", row))
        return found
    raise ValueError(f"{path}: no rows")


def check_row(task: str, fmt: str, row: dict, where: str) -> None:
    """Raise a ValueError naming ``where`` unless ``row`` has the shape ``fmt`` that its file was found in."""
    found = row_format(task, row)
    if found is None:
        raise ValueError(neither_message(task, where, row))
    if found != fmt:
        raise ValueError(f"{where}: a{'n' if found == 'official' else ''} {found} row in a file read as {fmt} "
                         f"(its first row's shape, or data_format); one file holds one format")
