"""The toy BPO loop: learning moves the gold reward, bad settings fail clearly, and the CLI runs."""

import numpy as np
import pytest

from bpo_jax.__main__ import main as cli_main
from bpo_jax.cli.toy import run


def test_bpo_improves_gold_reward_and_is_deterministic():
    a = run(num_phases=2, reference="behavior", total_steps=16, seed=3)
    b = run(num_phases=2, reference="behavior", total_steps=16, seed=3)
    assert a.shape == (17,)
    np.testing.assert_array_equal(a, b)
    assert a[-1] > a[0] + 0.2


def test_reference_changes_training():
    behavior = run(num_phases=4, reference="behavior", total_steps=16, seed=0)
    sft = run(num_phases=4, reference="sft", total_steps=16, seed=0)
    # Identical during phase 1 (π_β is the SFT model there), different afterwards.
    np.testing.assert_allclose(behavior[:5], sft[:5], rtol=1e-6)
    assert not np.allclose(behavior[5:], sft[5:])


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(num_phases=3, reference="behavior", total_steps=16), "multiple of num_phases"),
     (dict(num_phases=2, reference="ema"), "reference must be")],
)
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(**kwargs)


def test_cli(capsys):
    assert cli_main(["toy", "--total-steps", "4", "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    assert "BPO (F=2, ref=behavior)" in out and "end" in out
    assert cli_main(["nope"]) == 2
