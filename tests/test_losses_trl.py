"""``dap_loss`` against TRL's own DPO loss code (not a transcription of it): values, gradients and metrics.

TRL's ``DPOTrainer`` has no stand-alone loss function: the loss is computed inside ``_compute_loss`` (reached via
the public ``Trainer.compute_loss`` hook), right after a model forward that returns per-token log-probs. So the
test drives that method on a trainer shell:

* ``object.__new__(DPOTrainer)`` with the attributes ``_compute_loss`` reads, set from a real ``DPOConfig`` the way
  ``DPOTrainer.__init__`` sets them (``_shell``); no model, tokenizer or dataset is loaded. If a TRL upgrade reads
  another attribute, the test fails with an AttributeError rather than passing vacuously.
* a stand-in model (``_LogpModel``) whose forward returns the fields TRL reads from its fused-LM-head output; its
  per-token log-probs carry each sequence's summed log-prob on the first completion token (zeros elsewhere), so
  TRL's sum over tokens recovers exactly the policy log-probs we feed ``dap_loss``;
* ``precompute_ref_log_probs=True``: the reference log-probs come from the batch, as in BPO (behavior log-probs).

The completion mask gives each response a different length, which TRL's ``ipo`` divides by; ``dap_loss`` gets the
same counts as ``chosen_lengths``/``rejected_lengths``. Gradients are w.r.t. the policy log-probs of TRL's batch
mean loss (``loss.backward()``) and of ``mean(dap_loss)`` (``jax.grad``). Written against trl==1.16.0.
"""

import tempfile
import types
import zlib
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bpo_jax.losses import LOSS_TYPES, dap_loss

trl = pytest.importorskip("trl")  # skipped only without TRL; torch and accelerate are TRL's own dependencies
import accelerate  # noqa: E402
import torch  # noqa: E402

# DPOConfig's own default trips transformers 5's rename warning; nothing in this test sets that field.
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")

B, PROMPT, MAX_LEN = 8, 3, 9
# Loss types with the same name in TRL; (type, label_smoothing values). ε=0 is invalid for TRL's exo_pair.
TRL_TYPES = {
    "sigmoid": [0.0],
    "hinge": [0.0],
    "ipo": [0.0],
    "robust": [0.0, 0.1, 0.3],
    "exo_pair": [1e-3, 0.05, 0.2],
    "nca_pair": [0.0],
    "bco_pair": [0.0],
    "sppo_hard": [0.0],
    "aot": [0.0, 0.1],
    "aot_unpaired": [0.0, 0.1],
    "apo_zero": [0.0],
    "apo_down": [0.0],
    "discopop": [0.0],
}
NOT_TRL = ("cdpo", "bco_pair_batchmean")  # ours only: TRL must reject these names (no clash of meanings)
CASES = [(n, eps) for n, epss in TRL_TYPES.items() for eps in epss]


def test_every_loss_type_is_covered():
    assert set(TRL_TYPES) | set(NOT_TRL) == set(LOSS_TYPES)


class _LogpModel(torch.nn.Module):
    """Stands in for the policy: returns the summed log-probs ``logps`` [2B] (chosen then rejected, TRL's layout)
    as per-token log-probs on the first completion token, plus the other fields TRL's metrics read."""

    def __init__(self, logps):
        super().__init__()
        self.logps = logps

    def forward(self, input_ids, attention_mask=None, labels=None, fused_lm_head=False, use_cache=None):
        assert fused_lm_head and labels is not None
        shifted = labels[:, 1:] != -100  # position j predicts token j+1
        first = shifted & (shifted.cumsum(dim=1) == 1)
        log_probs = torch.where(first, self.logps[:, None], torch.zeros((), dtype=self.logps.dtype))
        zeros = torch.zeros_like(log_probs)
        return types.SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros,
                                     is_top1=torch.zeros_like(first))


def _shell(model, **config):
    """A DPOTrainer with only what ``_compute_loss`` reads, assigned as ``DPOTrainer.__init__`` assigns it."""
    args = trl.DPOConfig(output_dir=tempfile.mkdtemp(), precompute_ref_log_probs=True, report_to=[], use_cpu=True,
                         **config)
    t = object.__new__(trl.DPOTrainer)
    # A fresh single-process CPU Accelerator after the config (building TrainingArguments resets accelerate's state).
    t.args, t.model, t.accelerator = args, model, accelerate.Accelerator(cpu=True)
    t.beta = args.beta
    t.precompute_ref_logps = args.precompute_ref_log_probs
    t.loss_types = args.loss_type
    t.loss_weights = args.loss_weights or [1.0] * len(t.loss_types)
    t.ld_alpha = args.ld_alpha
    t.f_divergence_type = args.f_divergence_type
    t.f_alpha_divergence_coef = args.f_alpha_divergence_coef
    t.label_smoothing = args.label_smoothing
    t.use_weighting = args.use_weighting
    t.aux_loss_enabled = False
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    t._total_train_tokens = 0
    t._tp_size = 1
    return t


def _batch(seed, scale):
    """Summed log-probs (policy = reference + noise of size ``scale``) and per-response lengths."""
    rng = np.random.default_rng(seed)
    ref = (rng.normal(size=(2, B)) * 20.0 - 60.0).astype(np.float32)
    pol = (ref + rng.normal(size=(2, B)) * scale).astype(np.float32)
    lens = rng.integers(1, MAX_LEN + 1, size=(2, B))
    return pol, ref, lens


def _trl_loss(pol, ref, lens, **config):
    """TRL's loss, its gradient w.r.t. the policy log-probs and its logged metrics."""
    pc, pr = (torch.tensor(p, requires_grad=True) for p in pol)
    lengths = np.concatenate(lens)
    t = PROMPT + MAX_LEN
    completion_mask = torch.tensor(
        [[0] * PROMPT + [1] * n + [0] * (MAX_LEN - n) for n in lengths], dtype=torch.long)
    inputs = {
        "input_ids": torch.ones(2 * B, t, dtype=torch.long),
        "attention_mask": torch.tensor([[1] * (PROMPT + n) + [0] * (MAX_LEN - n) for n in lengths]),
        "completion_mask": completion_mask,
        "ref_chosen_logps": torch.tensor(ref[0]),
        "ref_rejected_logps": torch.tensor(ref[1]),
    }
    model = _LogpModel(torch.cat([pc, pr]))
    trainer = _shell(model, **config)
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return float(loss.detach()), np.stack([pc.grad.numpy(), pr.grad.numpy()]), metrics


def _ours(pol, ref, lens, **kw):
    def mean_loss(p):
        losses, metrics = dap_loss(p[0], p[1], ref[0], ref[1], chosen_lengths=lens[0], rejected_lengths=lens[1], **kw)
        return jnp.mean(losses), metrics

    (loss, metrics), grad = jax.value_and_grad(mean_loss, has_aux=True)(jnp.asarray(pol))
    return float(loss), np.asarray(grad), {k: float(v) for k, v in metrics.items()}


@pytest.mark.parametrize("name, eps", CASES)
@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("scale", [1.0, 5.0])
def test_matches_trl(name, eps, beta, scale):
    pol, ref, lens = _batch(zlib.crc32(repr((name, eps, beta, scale)).encode()), scale)
    tau = {"discopop": 0.05 if beta < 2.0 else 0.5}.get(name, 0.05)
    want, want_grad, trl_metrics = _trl_loss(pol, ref, lens, loss_type=name, beta=beta,
                                             label_smoothing=eps, discopop_tau=tau)
    got, grad, metrics = _ours(pol, ref, lens, loss_type=name, beta=beta, label_smoothing=eps, discopop_tau=tau)
    assert np.isfinite(want) and np.all(np.isfinite(want_grad))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6 * max(1.0, np.abs(want_grad).max()))
    # Reward metrics, as TRL logs them. Ours are on the log-probs the loss sees, length-averaged for ipo: skip it.
    if name != "ipo":
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            np.testing.assert_allclose(metrics[key], trl_metrics[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("alias, name", [("dpo", "sigmoid"), ("slic", "hinge")])
def test_aliases_match_trl(alias, name):
    pol, ref, lens = _batch(7, 3.0)
    want, want_grad, _ = _trl_loss(pol, ref, lens, loss_type=name, beta=0.3)
    got, grad, _ = _ours(pol, ref, lens, loss_type=alias, beta=0.3)
    np.testing.assert_allclose(got, want, rtol=2e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)


def test_trl_sigmoid_ignores_label_smoothing_and_cdpo_is_the_smoothed_form():
    """Why ours rejects ε for ``sigmoid``: TRL runs plain DPO whatever ε is. ``cdpo`` is not TRL 1.x's: it is
    -(1-ε)·logσ(βh) - ε·logσ(-βh), which equals TRL's ``robust`` times (1-2ε) plus 2ε·(-logσ(-βh))."""
    pol, ref, lens = _batch(11, 3.0)
    plain, _, _ = _trl_loss(pol, ref, lens, loss_type="sigmoid", beta=0.2)
    smoothed, _, _ = _trl_loss(pol, ref, lens, loss_type="sigmoid", beta=0.2, label_smoothing=0.2)
    assert plain == smoothed
    with pytest.raises(ValueError, match="loss_type 'cdpo'"):
        dap_loss(*jnp.asarray(np.concatenate([pol, ref])), loss_type="sigmoid", label_smoothing=0.2)
    robust, _, _ = _trl_loss(pol, ref, lens, loss_type="robust", beta=0.2, label_smoothing=0.2)
    h = (pol[0] - ref[0]) - (pol[1] - ref[1])
    flipped = np.mean(np.logaddexp(0.0, 0.2 * h.astype(np.float64)))  # mean of -logσ(-βh)
    cdpo, _, _ = _ours(pol, ref, lens, loss_type="cdpo", beta=0.2, label_smoothing=0.2)
    np.testing.assert_allclose(cdpo, robust * (1 - 0.4) + 0.4 * flipped, rtol=1e-5)


@pytest.mark.parametrize("name", NOT_TRL)
def test_our_own_names_are_not_trl_names(name):
    pol, ref, lens = _batch(3, 1.0)
    with pytest.raises(ValueError, match="Unknown loss type"):
        _trl_loss(pol, ref, lens, loss_type=name)
