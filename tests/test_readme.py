"""The README's loss-library example runs as written, given a model_apply, params and a batch; docs/layout.md
names every module once."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np


def test_readme_loss_example_runs():
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "dap_loss" in b)
    vocab, t, b = 11, 6, 3
    rng = np.random.default_rng(0)

    def model_apply(params, tokens):  # a bigram "LM": logits depend on the current token
        return params["table"][tokens]

    mask = jnp.asarray([[0, 0, 0, 1, 1, 1]] * b)
    ns = {
        "model_apply": model_apply,
        "params": {"table": jnp.asarray(rng.normal(size=(vocab, vocab)), jnp.float32)},
        "batch": {
            "chosen": jnp.asarray(rng.integers(0, vocab, (b, t))), "chosen_mask": mask,
            "rejected": jnp.asarray(rng.integers(0, vocab, (b, t))), "rejected_mask": mask,
            "ref_chosen_logps": jnp.full((b,), -7.0), "ref_rejected_logps": jnp.full((b,), -7.0),
        },
    }
    exec(compile(block, "README.md", "exec"), ns)
    grads, metrics = ns["grads"], ns["metrics"]
    assert grads["table"].shape == (vocab, vocab) and bool(jnp.any(grads["table"] != 0))
    assert set(metrics) >= {"rewards/chosen", "rewards/margins", "rewards/accuracies"}
    assert jax.tree.all(jax.tree.map(lambda x: bool(jnp.all(jnp.isfinite(x))), grads))


def _layout_modules(text: str) -> list[str]:
    """The ``bpo_jax/...`` module paths that docs/layout.md's first block names, from its indentation (two spaces a
    folder level)."""
    block = text.split("```", 2)[1]
    paths, folders = [], []
    for line in block.splitlines():
        name = line.strip().split(" ", 1)[0]
        if not name:
            continue
        depth = (len(line) - len(line.lstrip())) // 2
        folders = folders[:depth]
        if name.endswith("/"):
            folders.append(name.rstrip("/"))
        elif name.endswith(".py") and folders and folders[0] == "bpo_jax":
            paths.append("/".join([*folders, name]))
    return paths


def test_layout_names_every_module_once():
    """docs/layout.md is the real layout: one line per module of ``bpo_jax`` (package ``__init__.py`` files
    aside), none missing, none that does not exist."""
    root = pathlib.Path(__file__).parents[1]
    listed = _layout_modules((root / "docs" / "layout.md").read_text())
    real = sorted(str(p.relative_to(root)) for p in (root / "bpo_jax").rglob("*.py") if p.name != "__init__.py")
    assert len(listed) == len(set(listed)), [p for p in listed if listed.count(p) > 1]
    assert sorted(listed) == real, (sorted(set(real) - set(listed)), sorted(set(listed) - set(real)))
