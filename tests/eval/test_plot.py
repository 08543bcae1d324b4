"""The plot command: the series behind the PNG, resumed-run deduplication, and errors."""

import json

import numpy as np
import pytest

from bpo_jax.__main__ import main as cli
from bpo_jax.eval.plot import load_series, plot_runs


def _run(tmp_path, name, records):
    d = tmp_path / name
    d.mkdir()
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(d)


def test_series_and_png(tmp_path):
    bpo = _run(tmp_path, "bpo", [
        {"step": 0, "eval/win_rate": 0.4, "eval/ci_low": 0.3, "eval/ci_high": 0.5},
        {"step": 1, "loss": 0.69}, {"step": 2, "loss": 0.9},
        {"step": 2, "loss": 0.6},  # the same step again after a resume: the last record wins
        {"step": 2, "eval/win_rate": 0.6, "eval/ci_low": 0.5, "eval/ci_high": 0.7, "final": True}])
    offline = _run(tmp_path, "offline", [{"step": 1, "loss": 0.69}, {"step": 2, "loss": 0.68},
                                         {"step": 2, "eval/win_rate": 0.5, "eval/ci_low": 0.4, "eval/ci_high": 0.6}])
    s = load_series(bpo)
    np.testing.assert_array_equal(s["loss_step"], [1, 2])
    np.testing.assert_allclose(s["loss"], [0.69, 0.6])
    np.testing.assert_array_equal(s["eval_step"], [0, 2])
    np.testing.assert_allclose(s["win_rate"], [0.4, 0.6])
    out = tmp_path / "cmp.png"
    data = plot_runs([bpo, offline], str(out), labels=["BPO", "offline"])
    assert list(data) == ["BPO", "offline"] and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_allclose(data["offline"]["ci_high"], [0.6])
    assert cli(["plot", bpo, offline, "--out", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "b.png").stat().st_size > 1000


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl does not exist"):
        load_series(str(tmp_path))
    bad = _run(tmp_path, "bad", [])
    (tmp_path / "bad" / "metrics.jsonl").write_text("{oops\n")
    with pytest.raises(ValueError, match="metrics.jsonl:1: not valid JSON"):
        load_series(bad)
