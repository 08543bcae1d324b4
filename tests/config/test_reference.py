"""The config reference is the settings' own metadata: ``--help-config`` prints every key of every group with its
default, help and resumability, and ``docs/config.md`` is that text (it fails when the code and the page drift)."""

import dataclasses
import os

from bpo_jax.__main__ import main
from bpo_jax.config import GROUPS, RESUMABLE_KEYS
from bpo_jax.config.reference import markdown
from testing import ROOT


def test_every_key_once_with_its_default_and_resumability():
    text = markdown()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    keys = [row.split("`")[1] for row in rows]
    fields = [f for group in GROUPS.values() for f in dataclasses.fields(group)]
    assert keys == [f.name for f in fields]
    for row, f in zip(rows, fields):
        assert row.split(" | ")[2] == ("yes" if f.name in RESUMABLE_KEYS else "no"), row
    assert "| `beta` | `0.1` | no |" in text and "| `lora_targets` | `[q, k, v, o, gate, up, down]` |" in text
    assert [line for line in text.splitlines() if line.startswith("## ")] == [f"## `{g}`" for g in GROUPS]


def test_help_config_prints_it_and_docs_config_md_is_it(capsys):
    for command in ("train", "sft"):
        assert main([command, "--help-config"], join=False) == 0
        assert capsys.readouterr().out == markdown()
    with open(os.path.join(ROOT, "docs", "config.md")) as f:
        assert f.read() == markdown(), "docs/config.md is stale: python -m bpo_jax train --help-config > docs/config.md"
