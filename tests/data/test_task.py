"""The demo task's data, the ROUGE-L gold reward and the win rate, on hand-computed cases."""

import json
import os

import numpy as np
import pytest

from bpo_jax.data.minisum import DATA_DIR, groups, load_rows, prompt_text
from bpo_jax.eval.annotators import FunctionAnnotator, RougeAnnotator, rouge_l_f1
from bpo_jax.eval.win_rate import win_rate_from_scores


def test_shipped_minisum():
    train, test = load_rows(os.path.join(DATA_DIR, "train.jsonl")), load_rows(os.path.join(DATA_DIR, "test.jsonl"))
    assert (len(train), len(test)) == (128, 48)
    ids = [r["id"] for r in train + test]
    assert len(set(ids)) == len(ids)
    assert not {r["document"] for r in train} & {r["document"] for r in test}
    # Each row names its template (minisum's generator writes them in turn): the groups of the report's CIs.
    assert groups(test) == [r["group"] for r in test] and len(set(groups(test))) == 8
    assert groups(test)[:8] == groups(test)[8:16] and groups(train)[:8] == groups(test)[:8]
    gold = RougeAnnotator({prompt_text(r): r["gold"] for r in test})
    ref_scores = gold([prompt_text(r) for r in test], [r["reference"] for r in test])
    assert 0.2 < ref_scores.mean() < 0.6  # references are decent but beatable summaries of the gold facts


def test_malformed_rows_name_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    good = json.dumps({"id": "a", "document": "d", "reference": "r", "gold": "g"})
    f.write_text(good + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        load_rows(str(f))
    f.write_text(good + "\n" + json.dumps({"id": "b", "document": "d", "reference": "r"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing or empty field 'gold'"):
        load_rows(str(f))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_rows(str(tmp_path / "none.jsonl"))
    # A group is optional, but a file gives one to every row or to none, and never an empty one.
    grouped = json.dumps({"id": "b", "document": "d", "reference": "r", "gold": "g", "group": "x"})
    f.write_text("\n" + good + "\n" + grouped + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:3: a 'group' field, unlike line 2: give every row a group"):
        load_rows(str(f))
    f.write_text(grouped + "\n" + good + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no 'group' field, unlike line 1"):
        load_rows(str(f))
    f.write_text(grouped.replace('"x"', '" "') + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing or empty field 'group'"):
        load_rows(str(f))
    f.write_text(good + "\n")
    assert groups(load_rows(str(f))) is None


def test_rouge_l_closed_forms():
    assert rouge_l_f1("the cat sat", "the cat sat") == 1.0
    assert rouge_l_f1("", "the cat") == 0.0
    # LCS("the cat sat on the mat", "the cat is on a mat") = the cat on mat = 4; P = 4/6, R = 4/6.
    np.testing.assert_allclose(rouge_l_f1("The cat sat on the mat.", "the cat is on a mat"), 4 / 6)
    # Padding lowers precision: a longer candidate with the same LCS scores less.
    assert rouge_l_f1("the cat sat and then more words here", "the cat sat") < rouge_l_f1("the cat sat", "the cat sat")


def test_win_rate_hand_cases():
    wr = win_rate_from_scores([1.0, 0.5, 0.2, 0.9], [0.5, 0.5, 0.3, 0.1])  # win, tie, loss, win
    assert wr.win_rate == pytest.approx(2 / 4) and wr.n == 4  # the paper's rule: a tie is not a win
    assert wr.tie_rate == pytest.approx(1 / 4) and wr.win_rate_ties_half == pytest.approx(2.5 / 4)
    assert 0.0 <= wr.ci_low <= wr.win_rate <= wr.ci_high <= 1.0
    assert win_rate_from_scores([1, 1], [0, 0]).ci_low == 1.0
    # 240 wins, 40 ties, 120 losses of 400: p = 0.6 (ties lose); the percentile bootstrap CI of a mean of n
    # i.i.d. outcomes approaches the normal interval p ± 1.96·sd/√n (sd of the 1 / 0 outcomes).
    scores = np.array([1.0] * 240 + [0.5] * 40 + [0.0] * 120)
    wr = win_rate_from_scores(scores, np.full(400, 0.5), num_bootstrap=4000)
    half = 1.96 * (scores > 0.5).std() / np.sqrt(400)
    assert wr.win_rate == pytest.approx(0.6) and wr.tie_rate == pytest.approx(0.1)
    assert wr.ci_low == pytest.approx(0.6 - half, abs=0.006) and wr.ci_high == pytest.approx(0.6 + half, abs=0.006)
    with pytest.raises(ValueError, match="equal-length"):
        win_rate_from_scores([1.0], [1.0, 2.0])


def test_win_rate_ci_that_resamples_groups():
    """Two groups of 4 prompts, one won whole and one lost whole: a replicate draws both groups twice, once or
    the other twice (1/4, 1/2, 1/4), so the group CI is [0, 1], while the prompt CI stays inside (0, 1)."""
    scores, refs, groups = [1.0] * 4 + [0.0] * 4, [0.5] * 8, ["a"] * 4 + ["b"] * 4
    wr = win_rate_from_scores(scores, refs, groups=groups, num_bootstrap=2000)
    assert (wr.win_rate, wr.ci_groups_low, wr.ci_groups_high, wr.n_groups) == (0.5, 0.0, 1.0, 2)
    assert 0.0 < wr.ci_low < 0.5 < wr.ci_high < 1.0
    assert wr.metrics()["eval/n_groups"] == 2 and "resampling its 2 groups whole: 0.0–100.0" in wr.describe()
    plain = win_rate_from_scores(scores, refs, num_bootstrap=2000)  # without groups: no group fields, same CI
    assert plain == wr._replace(ci_groups_low=None, ci_groups_high=None, n_groups=None)
    assert "eval/n_groups" not in plain.metrics() and "groups" not in plain.describe()
    with pytest.raises(ValueError, match="3 group labels for 8 prompts"):
        win_rate_from_scores(scores, refs, groups=["a", "b", "c"])


def test_function_annotator():
    ann = FunctionAnnotator(lambda p, r: len(r))
    np.testing.assert_array_equal(ann(["a", "b"], ["xx", "y"]), [2.0, 1.0])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        ann(["a", "b"], ["x"])
