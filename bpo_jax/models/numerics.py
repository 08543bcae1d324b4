"""The numerics settings a model config and a run config share, in the model layer that applies them
(``models.config`` reads them; ``bpo_jax.config``, a layer above, checks its keys against them):
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
