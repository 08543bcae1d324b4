"""SFT: the loss is the mean NLL of the response tokens only (HF transformers' own causal-LM loss with the prompt
labelled -100 as the reference; a hand-computed value), whatever the micro-batching; rows are laid out prompt |
response + EOS; the cosine schedule is transformers'; an interrupted SFT resumes to the same adapters; bad SFT rows
are one clear error."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bpo_jax.config import TrainConfig
from bpo_jax.config.groups import Optimizer
from bpo_jax.data.prompts import PlainText
from bpo_jax.data.sft import encode_rows, sft_rows
from bpo_jax.train import sft
from bpo_jax.train import state as st
from bpo_jax.train.loop import Preempted, Preemption
from bpo_jax.train.sft_step import make_sft_step
from testing import write_minisum_folder

P, N = 5, 4


def _batch(seed=0, rows=4, vocab=128):
    """Rows [left-padded prompt of 2..P tokens | right-padded response of 1..N tokens]."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (rows, P + N)).astype(np.int32)
    col = np.arange(P + N)[None]
    left = rng.integers(0, P - 1, rows)[:, None]
    length = np.array([1, 2, N, 3])[:rows, None]  # micro-batches of 3 and 7 response tokens
    mask = (((col >= left) & (col < P)) | ((col >= P) & (col < P + length))).astype(np.int32)
    return np.where(mask == 1, ids, 0).astype(np.int32), mask


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from bpo_jax.models import load_pretrained
    from tiny_models import save_hf_model

    folder = tmp_path_factory.mktemp("sft_llama")
    hf = save_hf_model("llama", folder)
    return hf, load_pretrained(str(folder))[0], torch


def _step_loss(model, batches, micro_batches=1):
    """The jitted SFT step's (loss, response tokens) on each ``(ids, mask)``, full fine-tuning from the base."""
    cfg = TrainConfig(lora_rank=0, batch_size=4, micro_batches=micro_batches, total_steps=1, num_phases=1)
    out, step = [], None
    for ids, mask in batches:
        state = st.create_state(cfg, model.params, jax.random.key(0))  # the step donates it: one per call
        step = step or make_sft_step(cfg, model.config, st.shardings(state), prompt_len=P)
        metrics = step(state, {"ids": jnp.asarray(ids), "mask": jnp.asarray(mask)})[1]
        out.append((float(metrics["loss"]), float(metrics["tokens"])))
    return out


@pytest.mark.slow
def test_loss_is_the_mean_nll_of_the_response_tokens_only(hf_llama):
    hf, model, torch = hf_llama
    ids, mask = _batch()
    labels = np.where((mask == 1) & (np.arange(P + N)[None] >= P), ids, -100)  # the prompt labelled -100, as TRL
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos), labels=torch.tensor(labels, dtype=torch.long))
    logp = torch.log_softmax(out.logits, -1).numpy()
    nll = -np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]  # position t predicts token t + 1
    response = labels[:, 1:] != -100
    by_hand = nll[response].mean()
    all_tokens = nll[mask[:, 1:] == 1].mean()  # what a loss on the prompt too would be
    other = ids.copy()
    other[mask == 0] = 7  # padding carries no loss and no attention
    (loss, tokens), (padded, _) = _step_loss(model, [(ids, mask), (other, mask)])
    assert tokens == response.sum() == 10
    assert loss == pytest.approx(float(out.loss), abs=1e-5) and loss == pytest.approx(by_hand, abs=1e-5)
    assert abs(all_tokens - by_hand) > 1e-3  # the check can tell a prompt-masked loss from a full one
    assert padded == pytest.approx(loss, abs=1e-6)
    assert _step_loss(model, [(ids, mask)], micro_batches=2)[0][0] == pytest.approx(loss, abs=1e-6)  # not a mean
    # of the micro-batches' means: their token counts differ


class _Tok:
    """Characters as token ids, BOS 1 with special tokens (as a plain-text prompt is encoded)."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) for c in text]}


def test_rows_are_prompt_then_response_with_eos_and_long_prompts_dropped():
    rows = [(PlainText("ab"), "xyz"), (PlainText("abcd"), "x"), (PlainText("a" * 9), "y")]
    (train, held), dropped = encode_rows(_Tok(), (rows, rows[:1]), eos_id=2, max_prompt_length=5,
                                         max_response_length=3)
    assert dropped == [1, 0] and train.prompt_len == 5 and train.ids.shape == (2, 8)
    np.testing.assert_array_equal(train.ids, [[0, 0, 1, 97, 98, 120, 121, 122],  # cut to 3: no room for EOS
                                              [1, 97, 98, 99, 100, 120, 2, 0]])
    np.testing.assert_array_equal(train.mask, [[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(held.ids, train.ids[:1])


def test_official_rows_and_their_errors(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "SUBREDDIT: r/a TL;DR: ", "label": "a"}) + "\n")
    cfg = TrainConfig(sft_data=str(tmp_path))
    with pytest.raises(ValueError, match="has no held-out file .dev.jsonl or test.jsonl"):
        sft_rows(cfg)
    (tmp_path / "test.jsonl").write_text(json.dumps({"prompt": "p"}) + "\n")
    with pytest.raises(ValueError, match=r"test.jsonl:1: .* missing or empty 'label'"):
        sft_rows(cfg)
    (tmp_path / "dev.jsonl").write_text(json.dumps({"prompt": "q", "label": "b"}) + "\n")
    rows = sft_rows(cfg)  # dev.jsonl is preferred, as the official sft_train.py reads it
    assert rows.train == [("SUBREDDIT: r/a TL;DR: ", "a")] and rows.heldout == [("q", "b")]
    assert isinstance(rows.train[0][0], PlainText)


def test_a_tfds_task_gives_its_training_references(tmp_path):
    from bpo_jax.wiring.tasks import prepare_tfds

    cfg = TrainConfig(data="hh_helpful", reward_model="unused", data_dir="", tfds_dir=str(tmp_path))
    rows = sft_rows(cfg, prepare_tfds(cfg.data, cfg.data_dir, cfg.tfds_dir))
    assert rows.train and rows.heldout and rows.source == "task hh_helpful"
    prompt, response = rows.train[0]
    assert prompt[-1]["role"] == "user" and isinstance(response, str) and response.strip()


def test_cosine_schedule_is_transformers_without_warmup():
    torch = pytest.importorskip("torch")
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=5e-5)
    hf = get_cosine_schedule_with_warmup(opt, num_warmup_steps=0, num_training_steps=10)
    theirs = []
    for _ in range(10):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        hf.step()
    ours = Optimizer(learning_rate=5e-5, lr_schedule="cosine").checked().schedule(10)
    np.testing.assert_allclose([float(ours(t)) for t in range(10)], theirs, rtol=1e-6)


class _StopAfter:
    """A ``Preemption`` whose SIGTERM arrives after ``n`` checks."""

    def __init__(self, n):
        self.n = n

    def requested(self):
        self.n -= 1
        return self.n < 0


@pytest.mark.slow
def test_interrupted_sft_resumes_to_the_same_adapters(tiny_policy_and_rm, tmp_path):
    from bpo_jax.models.peft_adapters import read_adapter
    from bpo_jax.runtime.trackers import Trackers

    data = write_minisum_folder(tmp_path)
    runs = {}
    # SIGTERM after seed 1's second step (global step 5): the rerun skips seed 0 and resumes seed 1
    for name, stops in (("straight", [None]), ("interrupted", [_StopAfter(4), None])):
        cfg = TrainConfig(model=tiny_policy_and_rm[0], data=str(data), run_dir=str(tmp_path / name), sft_seeds=2,
                          sft_steps=3, batch_size=2, lora_rank=2, lora_alpha=4, max_new_tokens=8,
                          learning_rate=1e-2, checkpoint_every=1, tracker=("none",))
        run = sft.setup(cfg)
        for stop in stops:
            with Preemption() as real:
                try:
                    runs[name] = sft.train_seeds(run, stop=stop or real, trackers=Trackers())
                except Preempted:
                    assert stop is not None
    shapes = {t: v.shape for t, v in run.model.params["layers"].items() if t in cfg.lora_targets}
    for a, b in zip(runs["straight"], runs["interrupted"]):
        jax.tree.map(np.testing.assert_array_equal, read_adapter(a, shapes).factors, read_adapter(b, shapes).factors)
    first, second = (read_adapter(f, shapes).factors["q"]["a"] for f in runs["straight"])
    assert np.abs(first - second).max() > 1e-3  # each seed its own initialisation
    lines = [json.loads(x) for x in (tmp_path / "interrupted" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4, 5, 6]  # no step trained twice
