"""``python -m bpo_jax generate`` on the shipped SmolLM2 answers sensibly on the CPU."""

import pytest

from bpo_jax.__main__ import main


@pytest.mark.slow
def test_generate_command(capsys):
    assert main(["generate", "--prompt", "What is the capital of France?", "--max-new-tokens", "12"]) == 0
    assert "Paris" in capsys.readouterr().out
