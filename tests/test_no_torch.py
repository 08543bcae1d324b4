"""The runtime needs no torch, nor anything else that only the test extras install: every CLI command runs in a
subprocess that sees just what ``requirements.txt`` installs (``multihost.child_env``, by ``torchless.py``'s
``sitecustomize.py``; the child's environment is built explicitly). Every other child process of the suite runs
the same way; here the block itself is checked, and each command a newcomer runs first.
"""

import json
import re
import subprocess
import sys

import pytest

from multihost import child_env
from testing import ROOT, write_minisum_folder
from torchless import extras_only_modules


@pytest.fixture(scope="module")
def torchless_env():
    blocked = extras_only_modules()
    assert "torch" in blocked and "pytest" in blocked and "jax" not in blocked and "transformers" not in blocked
    return child_env(2)


def _run(env, *args, timeout=600, stderr=False):
    """The command's stdout (with ``stderr``: ``(stdout, stderr)``), after checking it succeeded."""
    proc = subprocess.run([sys.executable, "-m", "bpo_jax", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, f"`bpo_jax {' '.join(args)}` failed without torch:\n{proc.stderr[-4000:]}"
    return (proc.stdout, proc.stderr) if stderr else proc.stdout


# A line from a library rather than bpo_jax: transformers' "[transformers] PyTorch was not found ..." advisory,
# absl's and TensorFlow/XLA's C++ log lines ("W1203 07:00:00.123 ..."), Python warnings naming those packages.
_LIBRARY_LINE = re.compile(r"\[transformers\]|PyTorch was not found|absl|tensorflow|orbax|^[IWEF]\d{4} \d\d:",
                           re.IGNORECASE)


def test_the_block_really_hides_torch(torchless_env):
    code = ("import importlib.util, sys\nassert importlib.util.find_spec('torch') is None\n"
            "try:\n    import torch\nexcept ModuleNotFoundError:\n    sys.exit(0)\nsys.exit(1)\n")
    assert subprocess.run([sys.executable, "-c", code], env=torchless_env).returncode == 0


@pytest.mark.slow
def test_generate_with_the_shipped_gguf_without_torch(torchless_env):
    out = _run(torchless_env, "generate", "--prompt", "What is the capital of France?", "--max-new-tokens", "8")
    assert "Paris" in out


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_train_run_starts_quietly(torchless_env, tiny_policy_and_rm, tmp_path):
    """No line from transformers, absl or TensorFlow; the first line on stdout is bpo_jax's (--debug brings the
    libraries' own messages back: ``bpo_jax.__main__.quiet_libraries``)."""
    data = tmp_path / "data"
    data.mkdir()
    write_minisum_folder(data)
    out, err = _run(torchless_env, "train", f"model={tiny_policy_and_rm[0]}", f"data={data}",
                    f"run_dir={tmp_path / 'run'}", "total_steps=1", "num_phases=1", "batch_size=2", "max_new_tokens=4",
                    "eval_max_new_tokens=4", "lora_rank=2", "tied_pairs=second", "export_policy=false", stderr=True)
    assert out.splitlines()[0].startswith("bpo_jax train: ")
    noisy = [line for line in (out + err).splitlines() if _LIBRARY_LINE.search(line)]
    assert not noisy, noisy
