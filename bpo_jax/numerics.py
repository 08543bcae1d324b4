"""The numerics settings a model config and a run config share, at the bottom of the package (both import it):
rematerialisation policies and attention implementations. Pure Python."""

from __future__ import annotations

REMAT_POLICIES = ("none", "full", "dots")
ATTENTION_IMPLS = ("xla", "cudnn")  # the attention of full-sequence forwards


def remat_policy(value) -> str:
    """A remat setting as one of REMAT_POLICIES; booleans (the older form) mean full (True) or none (False)."""
    named = {"true": "full", "1": "full", "yes": "full", "false": "none", "0": "none", "no": "none"}
    name = str(value).lower()
    name = named.get(name, name)
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat={value!r}; valid: {', '.join(REMAT_POLICIES)} (true = full, false = none)")
    return name
