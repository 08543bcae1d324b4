"""``python -m bpo_jax sft`` end to end: two seeds give two PEFT folders that PEFT's own loader puts on the HF model to
bpo_jax's logits, their held-out loss falls, the win rate and identical-sample rate are reported, the printed
``train`` overrides start an ensemble from them, a rerun skips finished seeds; the shipped SFT configs carry the
official settings and run with a tiny model."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bpo_jax.__main__ import main as cli
from bpo_jax.config import load_config
from bpo_jax.models import forward, load_pretrained, lora
from bpo_jax.models.peft_adapters import read_adapter
from bpo_jax.train import state as st
from bpo_jax.wiring import lifecycle
from testing import ROOT, write_minisum_folder

IDS = np.random.default_rng(0).integers(3, 49152, (2, 7))
TINY = ["sft_steps=3", "batch_size=2", "lora_rank=2", "lora_alpha=4", "max_new_tokens=8", "learning_rate=1e-2",
        "tracker=none"]


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_seeds_give_peft_adapters_that_start_train(tiny_policy_and_rm, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    policy, run = tiny_policy_and_rm[0], tmp_path / "run"
    args = ["sft", f"model={policy}", f"data={write_minisum_folder(tmp_path)}", f"run_dir={run}", "sft_seeds=2", *TINY]
    assert cli(args) == 0
    printed = re.search(r"start train from these with: (.*)", capsys.readouterr().out).group(1)
    folders = [str(run / "adapters" / f"seed_{k}") for k in range(2)]
    assert printed == f"lora_init_from={','.join(folders)} ensemble_size=2 lora_rank=2 lora_alpha=4 " \
                      f"lora_targets=q,k,v,o,gate,up,down"
    held = {r.get("seed"): r["eval/heldout_loss"] for r in _metrics(run) if "eval/heldout_loss" in r}
    assert held[0] < held[None] and held[1] < held[None]  # None: the base, before
    reports = [r for r in _metrics(run) if "eval/heldout_loss" in r]  # minisum has a scorer: the report's figures
    assert len(reports) == 3 and all(0.0 <= r["eval/win_rate"] <= 1.0 and r["eval/n"] == 6 and
                                     0.0 <= r["eval/identical_sample_rate"] <= 1.0 and
                                     abs(6 * r["eval/truncation_rate"] - round(6 * r["eval/truncation_rate"])) < 1e-9
                                     for r in reports)
    model, _ = load_pretrained(policy)
    shapes = {t: model.params["layers"][t].shape for t in lora.TARGETS}
    def hf_logits(folder=None):  # PEFT puts the adapter into the HF model it is given: a fresh one each time
        hf = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
        model = peft.PeftModel.from_pretrained(hf, folder).eval() if folder else hf
        with torch.no_grad():
            return model(torch.tensor(IDS)).logits.numpy()

    cfg = load_config(None, [f"model={policy}", f"run_dir={tmp_path / 'train'}", *printed.split()])
    lora_init, _ = lifecycle.sft_start(cfg, model.params)  # as `train` reads lora_init_from
    state = st.create_state(cfg, model.params, jax.random.key(0), lora_init=lora_init)
    for k, folder in enumerate(folders):
        theirs = hf_logits(folder)
        ours = forward(model.config, lora.attach(model.params, read_adapter(folder, shapes).factors, 2.0),
                       jnp.asarray(IDS, jnp.int32))[0]
        np.testing.assert_allclose(theirs, np.asarray(ours), atol=1e-4, rtol=1e-4)
        member = st.adapter_params(cfg, state.base, jax.tree.map(lambda x: x[k], state.trainable))
        np.testing.assert_allclose(np.asarray(forward(model.config, member, jnp.asarray(IDS, jnp.int32))[0]), theirs,
                                   atol=1e-4, rtol=1e-4)
    assert np.abs(theirs - hf_logits()).max() > 1e-3  # the adapters changed the model
    assert cli(args) == 0  # a rerun: both seeds are done, nothing trains again
    out = capsys.readouterr().out
    assert "seed 0: done" in out and "seed 1: done" in out
    assert max(r["step"] for r in _metrics(run)) == 6


SFT_CONFIGS = ("tldr_gemma2b_sft", "hh_gemma2b_sft", "smollm2_sft_cpu")


@pytest.mark.parametrize("name", SFT_CONFIGS)
def test_shipped_sft_configs_build(name):
    cfg = load_config(f"{ROOT}/configs/{name}.yaml")
    assert cfg.lr_schedule == "cosine" and cfg.sft_seeds >= 2
    if name != "smollm2_sft_cpu":  # the official SFT: train/sft_train.py
        assert (cfg.lora_rank, cfg.lora_alpha, cfg.learning_rate, cfg.batch_size, cfg.micro_batches, cfg.sft_steps,
                cfg.sft_seeds) == (256, 512, 5e-5, 64, 16, 781, 5)
        assert cfg.lora_targets == lora.TARGETS and cfg.weight_decay == 0.0


@pytest.mark.slow
def test_paper_sft_config_runs_with_a_tiny_model_on_official_rows(tiny_policy_and_rm, tmp_path):
    data, run = tmp_path / "sft_tldr_data", tmp_path / "run"
    data.mkdir()
    for split, n in (("train", 4), ("dev", 3)):  # official rows, as util/extract_train_data.py writes them
        rows = [{"prompt": f"SUBREDDIT: r/town\nTITLE: Park {i}\nPOST: We got {i} benches.\nTL;DR: ",
                 "label": f"{i} new benches"} for i in range(n)]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli(["sft", "--config", f"{ROOT}/configs/tldr_gemma2b_sft.yaml", f"model={tiny_policy_and_rm[0]}",
                f"sft_data={data}", f"run_dir={run}", "sft_seeds=1", "micro_batches=1", "param_dtype=float32",
                "dtype=float32", "remat=false", f"reward_model={tiny_policy_and_rm[1]}", *TINY]) == 0
    assert (run / "adapters" / "seed_0" / "adapter_config.json").exists()
    assert [r["eval/heldout_rows"] for r in _metrics(run) if r["step"] == 0] == [3]  # dev.jsonl is held out
    # the reward model scores greedy responses to the dev prompts against their labels, before and after
    assert [(r["eval/n"], 0 <= r["eval/identical_sample_rate"] <= 1) for r in _metrics(run)
            if "eval/heldout_loss" in r] == [(3, True), (3, True)]


@pytest.mark.slow
def test_report_warns_when_the_model_samples_the_same_text_twice(tiny_policy_and_rm, tmp_path, caplog):
    from bpo_jax.train import sft
    from bpo_jax.wiring.sft_report import sft_report

    cfg = load_config(None, [f"model={tiny_policy_and_rm[0]}", f"data={write_minisum_folder(tmp_path)}",
                             f"run_dir={tmp_path / 'run'}", "temperature=1e-4", *TINY])  # nearly greedy
    run = sft.setup(cfg)
    with caplog.at_level("WARNING", logger="bpo_jax.wiring.sft_report"):
        metrics = sft_report(cfg, run)(run.model.params, "step 0")
    assert metrics["eval/identical_sample_rate"] == 1.0 and metrics["eval/n"] == 6
    assert "step 0: 100% of the test prompts' two samples are the same text" in caplog.text
    assert sft_report(cfg.replace(sft_data=str(tmp_path)), run) is None  # official rows: no scorer here
