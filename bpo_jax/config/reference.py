"""The config reference, written from the settings' own metadata (``groups.setting``): every key with its group,
default, help text and whether a resume of the same run may change it. ``python -m bpo_jax train --help-config``
(and ``sft --help-config``) prints it, and ``docs/config.md`` is the same text (a test fails when they drift:
regenerate it with ``python -m bpo_jax train --help-config > docs/config.md``)."""

from __future__ import annotations

import dataclasses

from bpo_jax.config.groups import GROUPS

HEADER = """# Config reference

Every key of `python -m bpo_jax train` and `sft`, by group, as `bpo_jax/config/groups.py` defines it (this page is
`python -m bpo_jax train --help-config`; do not edit it by hand). A key is written flat (`beta=0.1`, `beta: 0.1`)
or with its group (`loss.beta=0.1`, or `loss: {beta: 0.1}` in YAML). *Resumable* keys may change when a run
resumes (how it executes, not what it computes); changing any other key on a resume is refused.
"""


def _default(value) -> str:
    """A default as it is written in YAML or on the command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_default(v) for v in value) + "]"
    return '""' if value == "" else str(value)


def _summary(group) -> str:
    """The group's own docstring's first paragraph (none for a group without one)."""
    doc = group.__doc__ or ""
    return "" if doc.startswith(f"{group.__name__}(") else " ".join(doc.strip().split("\n\n")[0].split())


def markdown() -> str:
    """The reference as Markdown: a table per group, keys in definition order."""
    lines = [HEADER]
    for name, group in GROUPS.items():
        lines += [f"## `{name}`", ""]
        if summary := _summary(group):
            lines += [summary, ""]
        lines += ["| key | default | resumable | meaning |", "|---|---|---|---|"]
        for field in dataclasses.fields(group):
            meaning = " ".join(field.metadata["help"].split()).replace("|", "\\|")
            lines.append(f"| `{field.name}` | `{_default(field.default)}` | "
                         f"{'yes' if field.metadata['resumable'] else 'no'} | {meaning} |")
        lines.append("")
    return "\n".join(lines)
