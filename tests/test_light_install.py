"""``pip install .`` without extras is enough for the loss library: a fresh venv gets only JAX (and NumPy), and
``bpo_jax.losses`` / ``bpo_jax.logprobs`` import and differentiate there. Slow (a venv and a JAX install, about
a minute from pip's cache); CI runs it."""

import os
import shutil
import subprocess
import venv

import pytest

from testing import ROOT

pytestmark = pytest.mark.slow  # several processes or a fresh venv (pyproject.toml's markers)


TRAINING_STACK = ("flax", "optax", "orbax", "transformers", "tensorflow_datasets", "grain", "gguf", "matplotlib",
                  "torch", "yaml")

_CHECK = f"""
import importlib.util
import jax, jax.numpy as jnp
from bpo_jax.losses import dap_loss
from bpo_jax.logprobs import sequence_logprobs

present = [m for m in {TRAINING_STACK!r} if importlib.util.find_spec(m) is not None]
assert not present, f"the base install pulled in {{present}}"

def loss(logits, tokens, mask, ref_w, ref_l):
    lp = sequence_logprobs(logits, tokens, mask)
    losses, metrics = dap_loss(lp.sum[0::2], lp.sum[1::2], ref_w, ref_l, loss_type="ipo", beta=0.1,
                               chosen_lengths=lp.count[0::2], rejected_lengths=lp.count[1::2])
    return losses.mean()

logits = jax.random.normal(jax.random.key(0), (4, 6, 11))
tokens = jax.random.randint(jax.random.key(1), (4, 6), 0, 11)
mask = jnp.asarray([[0, 0, 1, 1, 1, 1]] * 4)
g = jax.grad(loss)(logits, tokens, mask, jnp.full((2,), -5.0), jnp.full((2,), -6.0))
assert g.shape == logits.shape and bool(jnp.isfinite(g).all()) and bool((g != 0).any())
print("losses ok")
"""


def test_base_install_imports_and_differentiates_the_losses(tmp_path):
    src = tmp_path / "src"  # a copy of the package sources, so the build writes nothing into the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info",
                                                             "__pycache__", ".pytest_cache", "data", "docs"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = str(env_dir / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["JAX_PLATFORMS"] = "cpu"
    subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", str(src)], env=env,
                   check=True, timeout=900)
    out = subprocess.run([py, "-c", _CHECK], env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "losses ok" in out.stdout
