"""The runtime needs no torch: every CLI command runs in a subprocess where ``import torch`` fails.

torch is only a test extra (HF parity tests). A ``sitecustomize.py`` on the child's ``PYTHONPATH`` puts
``None`` in ``sys.modules`` for torch, which is exactly what Python does for a package that is not installed:
``import torch`` raises ``ModuleNotFoundError`` and ``importlib.util.find_spec("torch")`` is None (so
transformers' availability checks see no torch either). The child's environment is built explicitly.
"""

import json
import os
import subprocess
import sys

import pytest

_BLOCK = """import sys
for _name in ("torch", "torchvision", "torchaudio"):
    sys.modules[_name] = None  # what an uninstalled package looks like to import and find_spec
"""


@pytest.fixture(scope="module")
def torchless_env(tmp_path_factory):
    site = tmp_path_factory.mktemp("no_torch_site")
    (site / "sitecustomize.py").write_text(_BLOCK)
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    env.update(PYTHONPATH=str(site), JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONUNBUFFERED="1")
    return env


def _run(env, *args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "bpo_jax", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, f"`bpo_jax {' '.join(args)}` failed without torch:\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_the_block_really_hides_torch(torchless_env):
    code = ("import importlib.util, sys\nassert importlib.util.find_spec('torch') is None\n"
            "try:\n    import torch\nexcept ModuleNotFoundError:\n    sys.exit(0)\nsys.exit(1)\n")
    assert subprocess.run([sys.executable, "-c", code], env=torchless_env).returncode == 0


def test_generate_with_the_shipped_gguf_without_torch(torchless_env):
    out = _run(torchless_env, "generate", "--prompt", "What is the capital of France?", "--max-new-tokens", "8")
    assert "Paris" in out


def test_train_evaluate_plot_toy_without_torch(torchless_env, tiny_policy_and_rm, tmp_path):
    """A tiny run with a reward-model annotator (loads an HF policy folder and an RM folder, exports the policy,
    writes the plot), then ``evaluate`` on its checkpoint, ``plot`` and ``toy``."""
    policy, rm = tiny_policy_and_rm
    run = tmp_path / "run"
    out = _run(torchless_env, "train", f"model={policy}", "annotator=reward_model", f"reward_model={rm}",
               f"run_dir={run}", "total_steps=2", "num_phases=2", "batch_size=2", "max_new_tokens=4",
               "eval_size=4", "eval_max_new_tokens=4", "lora_rank=2", "reward_batch_size=4")
    assert "before ->" in out and (run / "policy" / "model.safetensors").is_file()
    out = _run(torchless_env, "evaluate", "--checkpoint", str(run))
    assert "win rate" in out
    with open(run / "eval.jsonl") as f:
        assert json.loads(f.readline())["step"] == 2
    _run(torchless_env, "plot", str(run), "--out", str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert "BPO" in _run(torchless_env, "toy", "--total-steps", "8", "--seeds", "1")
