"""The README's loss-library example runs as written, given a model_apply, params and a batch."""

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
