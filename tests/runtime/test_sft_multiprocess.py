"""``sft`` on several JAX processes (``tests/multihost.py``'s harness): two hosts of 2 CPU devices write the
adapter one process of 4 devices writes, with the same held-out loss, win rate and identical-sample rate (each
host scores its share of the test prompts). Its own file so that pytest-xdist runs it beside the train tests."""

import json

import numpy as np
import pytest

from multihost import run_group
from testing import write_minisum_folder

pytestmark = pytest.mark.slow  # several processes (pyproject.toml's markers)


def test_two_processes_sft_matches_one_process(tiny_policy_and_rm, tmp_path):
    from bpo_jax.models import load_pretrained, lora
    from bpo_jax.models.peft_adapters import read_adapter

    data = write_minisum_folder(tmp_path, rows=10)
    sft = ["sft", f"model={tiny_policy_and_rm[0]}", f"data={data}", "lora_rank=2", "learning_rate=5e-3", "seed=3",
           "sft_steps=3", "batch_size=4", "max_new_tokens=4", "eval_max_new_tokens=4", "eval_size=5", "sft_seeds=1"]
    single, multi = tmp_path / "single", tmp_path / "multi"
    [(rc, out, _)] = run_group([[*sft, f"run_dir={single}"]], devices=4)
    assert rc == 0, out[-3000:]
    both = run_group([[*sft, f"run_dir={multi}"]] * 2, devices=2)
    assert [r[0] for r in both] == [0, 0], [r[1][-2000:] for r in both]
    rows = lambda run: [{k: v for k, v in json.loads(x).items() if k.startswith("eval/")}  # noqa: E731
                        for x in (run / "metrics.jsonl").read_text().splitlines() if "eval/heldout_loss" in x]
    assert len(rows(single)) == 2  # step 0 and seed 0
    for a, b in zip(rows(single), rows(multi), strict=True):
        assert a.keys() == b.keys() and "eval/identical_sample_rate" in a and "eval/win_rate" in a
        np.testing.assert_allclose([a[k] for k in a], [b[k] for k in a], rtol=1e-5, atol=1e-6)
    params = load_pretrained(tiny_policy_and_rm[0])[0].params
    shapes = {t: params["layers"][t].shape for t in lora.TARGETS}
    got, want = (read_adapter(str(r / "adapters" / "seed_0"), shapes).factors for r in (multi, single))
    for t in want:
        for f in ("a", "b"):
            np.testing.assert_allclose(got[t][f], want[t][f], rtol=1e-5, atol=1e-6)
