"""Head-to-head comparison of two policies (``bpo_jax.eval.compare``) without a model: the judge asked in both
orders against the loopback judge, the both-orders rule, and what ``compare`` accepts as a policy
(``bpo_jax.train.restore.policy_source``)."""

import json

import numpy as np
import pytest

from bpo_jax.eval.compare import both_orders_outcome, judge_both_orders
from bpo_jax.eval.judge import Judge
from bpo_jax.train.restore import policy_source
from multihost import judge_server


def test_judge_is_asked_both_orders_and_a_win_needs_both():
    """The loopback judge prefers the longer response, the one shown first on equal length (a position bias)."""
    requests = []
    server = judge_server(gate=lambda: requests.append(1))
    try:
        judge = Judge(f"http://127.0.0.1:{server.server_port}/v1/chat/completions", "m", concurrency=4)
        prompts = ["p0", "p1", "p2", "p3"]
        a = ["a much longer answer", "short", "same", "identical"]
        b = ["short", "a much longer answer", "diff", "identical"]
        first, second = judge_both_orders(judge, prompts, a, b)
    finally:
        server.shutdown()
    assert len(requests) == 2 * 3  # both orders of each pair; identical responses are not asked
    np.testing.assert_array_equal(first[:3], [1.0, 0.0, 1.0])  # A shown first: longer wins, equal -> first (A)
    np.testing.assert_array_equal(second[:3], [1.0, 0.0, 0.0])  # B shown first: equal length -> first (B)
    assert np.isnan(first[3]) and np.isnan(second[3])
    # The position bias on p2 is cancelled: the orders disagree, so it is a tie.
    np.testing.assert_array_equal(both_orders_outcome(first, second), [1.0, -1.0, 0.0, 0.0])


def test_both_orders_rule_on_every_verdict_pair():
    first = [1, 1, 1, 0, 0, 0.5, 0.5, np.nan]
    second = [1, 0, 0.5, 0, 1, 0.5, 1, np.nan]
    np.testing.assert_array_equal(both_orders_outcome(first, second), [1, 0, 0, -1, 0, 0, 0, 0])


def test_policy_sources(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "4").mkdir(parents=True)
    (run / "config.yaml").write_text("total_steps: 4\n")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({}))
    got = policy_source(str(run) + "/")
    assert (got.run_dir, got.step, got.model, got.is_run) == (str(run), None, None, True)
    got = policy_source(str(run / "checkpoints" / "4"))
    assert (got.run_dir, got.step, got.is_run) == (str(run), 4, True)
    got = policy_source(str(model))
    assert (got.run_dir, got.model, got.is_run) == (None, str(model), False)
    with pytest.raises(ValueError, match="neither a run directory .* nor a model"):
        policy_source(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        policy_source(str(tmp_path / "missing"))
