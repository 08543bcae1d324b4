"""Direct-alignment-from-preferences (DAP) losses on sequence log-probabilities.

This module is pure JAX and imports nothing from the rest of ``bpo_jax``: copy it or import it into any
JAX training step. Everything here is ``jit``-, ``grad``- and ``vmap``-able.

All losses are functions of four ``[B]`` arrays of summed response log-probabilities:
``policy_chosen_logps`` (log π_θ(y_w|x)), ``policy_rejected_logps`` (log π_θ(y_l|x)) and the same two under the
reference model. In BPO (Xu et al., EMNLP 2024) the reference is the *behavior* LLM π_β that sampled the pair,
so the loss keeps the policy inside a trust region around the data-collecting model.

Notation used in the docstrings (log-ratios are policy minus reference):

* ``r_w = log π_θ(y_w) − log π_ref(y_w)`` and ``r_l = log π_θ(y_l) − log π_ref(y_l)``;
* ``h = r_w − r_l`` (the DPO "logits"); β is the inverse temperature; ε is ``label_smoothing``.

Inputs may be float32 or bfloat16; everything is computed in (at least) float32 and written with
``log_sigmoid``/``logaddexp`` forms, so the losses stay finite at |h| = 1e4.

Loss types carry TRL's ``DPOConfig.loss_type`` names *and meanings* (checked against the loss code of
``trl==1.16.0`` in tests/test_losses_trl.py). Two names are not TRL's: ``cdpo`` (conservative DPO, which older TRL
ran as ``sigmoid`` with ``label_smoothing``; TRL 1.x's ``sigmoid`` ignores ε) and ``bco_pair_batchmean`` (BCO's
reward shift δ, taken statelessly from the batch). Two inputs that TRL never runs have a meaning here:
``exo_pair`` with ε = 0 (TRL 1.x raises; here ε = 1e-3, as in TRL 0.x) and ``ipo`` without lengths (TRL always
length-averages; here the summed log-probs are used). TRL's ``sft`` and ``sigmoid_norm`` are not here.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array

# Loss types that read ``label_smoothing``; every other type rejects a non-zero value instead of ignoring it.
_SMOOTHED = ("cdpo", "robust", "exo_pair", "aot", "aot_unpaired")
ALIASES = {"dpo": "sigmoid", "slic": "hinge"}


def _f32(x: Array) -> Array:
    """Promote to at least float32 (bfloat16/float16 → float32; float64 stays float64)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _smoothed_logistic(z, eps):
    """``−(1−ε)·log σ(z) − ε·log σ(−z)``: the (label-smoothed) logistic loss on a scaled margin z."""
    return -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)


# Each loss takes the per-example log-ratios r_w, r_l, the policy and reference chosen-minus-rejected
# log-prob differences (so h = pi_diff − ref_diff = r_w − r_l), and the scalars β, ε, τ.


def _sigmoid(r_w, r_l, pi_diff, ref_diff, beta, eps, tau):
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization"): ``−log σ(βh)``. As in TRL 1.x, no label
    smoothing (a non-zero ε is rejected; see ``cdpo``)."""
    return -jax.nn.log_sigmoid(beta * (r_w - r_l))


def _cdpo(r_w, r_l, pi_diff, ref_diff, beta, eps, tau):
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO"), DPO under
    a label-flip rate ε: ``−(1−ε)·log σ(βh) − ε·log σ(−βh)``. TRL 0.x's ``sigmoid`` with ``label_smoothing``."""
    return _smoothed_logistic(beta * (r_w - r_l), eps)


def _hinge(r_w, r_l, pi_diff, ref_diff, beta, eps, tau):
    """SLiC (Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback"):
    ``max(0, 1 − βh)``."""
    return jax.nn.relu(1.0 - beta * (r_w - r_l))


def _ipo(r_w, r_l, pi_diff, ref_diff, beta, eps, tau):
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences"):
    ``(h − 1/(2β))²``. ``dap_loss`` length-averages the log-probs first when lengths are given; TRL always does
    (it divides each log-ratio by the completion's token count, at least 1), so pass lengths for TRL's ``ipo``."""
    return jnp.square((r_w - r_l) - 0.5 / beta)


def _robust(r_w, r_l, pi_diff, ref_diff, beta, eps, tau):
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy
    Feedback"), unbiased under a label-flip rate ε < 1/2: ``[−(1−ε)·log σ(βh) + ε·log σ(−βh)] / (1 − 2ε)``."""
    z = beta * (r_w - r_l)
    return (-(1.0 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1.0 - 2.0 * eps)


def _exo_pair(r_w, r_l, pi_diff, ref_diff, beta, eps, tau):
    """EXO, pairwise form (Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment"):
    KL(p_θ ‖ p_ε) from the model's preference distribution p_θ = (σ(βh), σ(−βh)) to the smoothed label
    p_ε = (1−ε, ε):
    ``σ(βh)·(log σ(βh) − log(1−ε)) + σ(−βh)·(log σ(−βh) − log ε)``. ε = 0 means the paper's 1e-3 (as in TRL 0.x;
    TRL 1.x raises instead)."""
    z = beta * (r_w - r_l)
    eps = jnp.where(eps == 0.0, 1e-3, eps)
    return jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - jnp.log1p(-eps)) + jax.nn.sigmoid(-z) * (
        jax.nn.log_sigmoid(-z) - jnp.log(eps)
    )


def _nca_pair(r_w, r_l, pi_diff, ref_diff, beta, eps, tau):
    """NCA, pairwise form (Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit
    Rewards"): ``−log σ(βr_w) − ½·log σ(−βr_w) − ½·log σ(−βr_l)``."""
    cw, cl = beta * r_w, beta * r_l
    return -jax.nn.log_sigmoid(cw) - 0.5 * jax.nn.log_sigmoid(-cw) - 0.5 * jax.nn.log_sigmoid(-cl)


def _bco_pair(r_w, r_l, pi_diff, ref_diff, beta, eps, tau):
    """BCO, pair form as in TRL 1.x (Jung et al. 2024, "Binary Classifier Optimization for Large Language Model
    Alignment"): chosen and rejected as positive and negative examples of one binary classifier with logit the
    implicit reward, ``−log σ(βr_w) − log σ(−βr_l)``. No reward shift δ (see ``bco_pair_batchmean``)."""
    return -jax.nn.log_sigmoid(beta * r_w) - jax.nn.log_sigmoid(-beta * r_l)


def _bco_pair_batchmean(r_w, r_l, pi_diff, ref_diff, beta, eps, tau):
    """BCO with its reward shift δ (Jung et al. 2024), stateless: ``−log σ(βr_w − δ) − log σ(−(βr_l − δ))``.
    The paper (and TRL 0.x) keep δ as a running mean of the rewards across steps; here δ is the mean of the
    batch's chosen and rejected rewards, held outside the gradient. Not a TRL name."""
    cw, cl = beta * r_w, beta * r_l
    delta = jax.lax.stop_gradient(0.5 * (jnp.mean(cw) + jnp.mean(cl)))
    return -jax.nn.log_sigmoid(cw - delta) - jax.nn.log_sigmoid(-(cl - delta))


def _sppo_hard(r_w, r_l, pi_diff, ref_diff, beta, eps, tau):
    """SPPO with hard labels (Wu et al. 2024, "Self-Play Preference Optimization for Language Model
    Alignment"): ``(r_w − 1/(2β))² + (r_l + 1/(2β))²``."""
    return jnp.square(r_w - 0.5 / beta) + jnp.square(r_l + 0.5 / beta)


def _aot(r_w, r_l, pi_diff, ref_diff, beta, eps, tau):
    """AOT, paired (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport"):
    Δ = sort(pi_diff) − sort(ref_diff), sorted over the batch (the 1-D optimal-transport plan, enforcing
    first-order stochastic dominance); loss ``−(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)``."""
    return _smoothed_logistic(beta * (jnp.sort(pi_diff, axis=-1) - jnp.sort(ref_diff, axis=-1)), eps)


def _aot_unpaired(r_w, r_l, pi_diff, ref_diff, beta, eps, tau):
    """AOT, unpaired (Melnyk et al. 2024): Δ = sort(r_w) − sort(r_l) over the batch; loss as for ``aot``."""
    return _smoothed_logistic(beta * (jnp.sort(r_w, axis=-1) - jnp.sort(r_l, axis=-1)), eps)


def _apo_zero(r_w, r_l, pi_diff, ref_diff, beta, eps, tau):
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions"):
    raise the chosen likelihood, lower the rejected — ``(1 − σ(βr_w)) + σ(βr_l)``."""
    return jax.nn.sigmoid(-beta * r_w) + jax.nn.sigmoid(beta * r_l)


def _apo_down(r_w, r_l, pi_diff, ref_diff, beta, eps, tau):
    """APO-down (D'Oosterlinck et al. 2024): lower both, the rejected more — ``σ(βr_w) + (1 − σ(βh))``."""
    return jax.nn.sigmoid(beta * r_w) + jax.nn.sigmoid(-beta * (r_w - r_l))


def _discopop(r_w, r_l, pi_diff, ref_diff, beta, eps, tau):
    """DiscoPOP, the log-ratio modulated loss (Lu et al. 2024, "Discovering Preference Optimization
    Algorithms with and for Large Language Models"): with z = βh and m = σ(z/τ),
    ``(1 − m)·(−log σ(z)) + m·exp(−z)``. The product m·exp(−z) is evaluated as ``exp(−z + log σ(z/τ))``,
    which stays finite (and NaN-free) for large negative z."""
    z = beta * (r_w - r_l)
    m = jax.nn.sigmoid(z / tau)
    return (1.0 - m) * -jax.nn.log_sigmoid(z) + jnp.exp(-z + jax.nn.log_sigmoid(z / tau))


_LOSSES: dict[str, Callable] = {
    "sigmoid": _sigmoid,
    "cdpo": _cdpo,
    "hinge": _hinge,
    "ipo": _ipo,
    "robust": _robust,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "bco_pair": _bco_pair,
    "bco_pair_batchmean": _bco_pair_batchmean,
    "sppo_hard": _sppo_hard,
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "discopop": _discopop,
}
LOSS_TYPES: tuple[str, ...] = tuple(_LOSSES)
# Losses whose value for a pair depends on the other pairs of its batch (a batch sort or a batch mean): computed
# per micro-batch they would be another loss, so gradient accumulation is refused for them (``bpo_jax.config``).
BATCH_COUPLED: tuple[str, ...] = ("bco_pair_batchmean", "aot", "aot_unpaired")


def _concrete(x):
    """The Python value of ``x`` when it is known at trace time, else None (validation is then skipped)."""
    try:
        return float(x)
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def canonical_loss_type(loss_type: str) -> str:
    """Resolve aliases (``dpo`` → ``sigmoid``, ``slic`` → ``hinge``); raise ValueError on unknown names."""
    name = ALIASES.get(loss_type, loss_type)
    if name not in _LOSSES:
        valid = ", ".join(LOSS_TYPES + tuple(f"{a} (= {b})" for a, b in ALIASES.items()))
        raise ValueError(f"unknown loss_type {loss_type!r}; valid choices: {valid}")
    return name


def validate_loss_args(loss_type: str, beta=0.1, label_smoothing=0.0, discopop_tau=0.05) -> str:
    """Check the hyper-parameters of a loss before any compute; return the canonical loss name.

    Values that are tracers (e.g. β passed as a traced array under jit) are not checked.
    """
    name = canonical_loss_type(loss_type)
    b, eps, tau = _concrete(beta), _concrete(label_smoothing), _concrete(discopop_tau)
    if b is not None and not (b > 0.0 and b < float("inf")):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if eps is not None:
        if name not in _SMOOTHED and eps != 0.0:
            hint = " (TRL's sigmoid ignores it; conservative DPO is loss_type 'cdpo')" if name == "sigmoid" else ""
            raise ValueError(
                f"label_smoothing={label_smoothing!r} has no effect for loss_type {name!r}{hint}; it is used only "
                f"by {', '.join(_SMOOTHED)}. Set it to 0.0."
            )
        if name == "robust" and not 0.0 <= eps < 0.5:
            raise ValueError(f"robust needs 0 <= label_smoothing < 0.5 (a label-flip rate), got {label_smoothing!r}")
        if name == "exo_pair" and not 0.0 <= eps < 1.0:
            raise ValueError(f"exo_pair needs 0 <= label_smoothing < 1, got {label_smoothing!r}")
        if name in ("cdpo", "aot", "aot_unpaired") and not 0.0 <= eps <= 0.5:
            raise ValueError(f"{name} needs 0 <= label_smoothing <= 0.5, got {label_smoothing!r}")
    if name == "discopop" and tau is not None and not tau > 0.0:
        raise ValueError(f"discopop_tau must be > 0, got {discopop_tau!r}")
    return name


def dap_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    reference_chosen_logps: Array,
    reference_rejected_logps: Array,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_lengths: Array | None = None,
    rejected_lengths: Array | None = None,
    discopop_tau: float = 0.05,
) -> tuple[Array, dict[str, Array]]:
    """Per-example DAP loss and summary metrics.

    Args:
      policy_chosen_logps, policy_rejected_logps: ``[B]`` summed response log-probs under the policy π_θ.
      reference_chosen_logps, reference_rejected_logps: ``[B]`` the same under the reference; in BPO, the
        behavior LLM π_β that sampled the pair.
      loss_type: one of ``LOSS_TYPES`` or an alias (``dpo``, ``slic``).
      beta: β > 0.
      label_smoothing: ε for ``cdpo``, ``robust``, ``exo_pair``, ``aot`` and ``aot_unpaired``.
      chosen_lengths, rejected_lengths: ``[B]`` response token counts. Only ``ipo`` uses them: all four
        log-probs are divided by their response length before the loss (as the BPO and TRL code do). Without
        them the log-probs are used as given.
      discopop_tau: τ > 0 of the DiscoPOP modulation.

    Returns:
      ``(per_example_loss [B] float32, metrics)`` where metrics holds scalars: ``rewards/chosen``,
      ``rewards/rejected`` (mean β·log-ratio), ``rewards/margins``, ``rewards/accuracies`` (fraction with
      chosen reward > rejected reward), ``logratios/chosen``, ``logratios/rejected`` (mean log-ratios) and
      ``logits`` (mean h). Metrics use the log-probs the loss sees (length-averaged for ``ipo``).
    """
    name = validate_loss_args(loss_type, beta, label_smoothing, discopop_tau)
    pc, pr = _f32(policy_chosen_logps), _f32(policy_rejected_logps)
    rc, rr = _f32(reference_chosen_logps), _f32(reference_rejected_logps)
    if name == "ipo" and (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("ipo needs both chosen_lengths and rejected_lengths, or neither")
    if name == "ipo" and chosen_lengths is not None:
        lw = jnp.maximum(_f32(chosen_lengths), 1.0)
        ll = jnp.maximum(_f32(rejected_lengths), 1.0)
        pc, rc, pr, rr = pc / lw, rc / lw, pr / ll, rr / ll

    r_w = pc - rc
    r_l = pr - rr
    beta = _f32(beta)
    losses = _LOSSES[name](r_w, r_l, pc - pr, rc - rr, beta, _f32(label_smoothing), _f32(discopop_tau))

    chosen_rewards = beta * r_w
    rejected_rewards = beta * r_l
    metrics = {
        "rewards/chosen": jnp.mean(chosen_rewards),
        "rewards/rejected": jnp.mean(rejected_rewards),
        "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
        "rewards/accuracies": jnp.mean((chosen_rewards > rejected_rewards).astype(chosen_rewards.dtype)),
        "logratios/chosen": jnp.mean(r_w),
        "logratios/rejected": jnp.mean(r_l),
        "logits": jnp.mean(r_w - r_l),
    }
    return losses, metrics

