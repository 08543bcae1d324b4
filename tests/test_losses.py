"""DAP losses against independent float64 NumPy formulas, closed forms, invariants and error messages."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bpo_jax.losses import LOSS_TYPES, dap_loss

# ---------------------------------------------------------------------------------------------------------
# Independent reference: each published formula written directly in float64 NumPy, on the four log-probs.
# ---------------------------------------------------------------------------------------------------------


def _logsig(x):
    return -np.logaddexp(0.0, -x)


def _sig(x):
    return np.exp(_logsig(x))


def np_loss(name, pc, pr, rc, rr, beta, eps=0.0, tau=0.05, lc=None, lr=None):
    if name == "ipo" and lc is not None:
        pc, rc, pr, rr = pc / lc, rc / lc, pr / lr, rr / lr
    rw, rl = pc - rc, pr - rr
    h = (pc - pr) - (rc - rr)
    if name == "sigmoid":
        return -_logsig(beta * h)
    if name == "cdpo":
        return -_logsig(beta * h) * (1 - eps) - _logsig(-beta * h) * eps
    if name == "hinge":
        return np.maximum(0.0, 1.0 - beta * h)
    if name == "ipo":
        return (h - 1.0 / (2.0 * beta)) ** 2
    if name == "robust":
        return (-_logsig(beta * h) * (1 - eps) + _logsig(-beta * h) * eps) / (1 - 2 * eps)
    if name == "exo_pair":
        e = eps if eps else 1e-3
        p, q = _sig(beta * h), _sig(-beta * h)
        return p * (np.log(p) - np.log(1 - e)) + q * (np.log(q) - np.log(e))
    if name == "nca_pair":
        return -_logsig(beta * rw) - 0.5 * _logsig(-beta * rw) - 0.5 * _logsig(-beta * rl)
    if name == "bco_pair":
        return -_logsig(beta * rw) - _logsig(-beta * rl)
    if name == "bco_pair_batchmean":
        delta = np.concatenate([beta * rw, beta * rl]).mean()
        return -_logsig(beta * rw - delta) - _logsig(-(beta * rl - delta))
    if name == "sppo_hard":
        return (rw - 0.5 / beta) ** 2 + (rl + 0.5 / beta) ** 2
    if name == "aot":
        d = np.sort(pc - pr) - np.sort(rc - rr)
        return -_logsig(beta * d) * (1 - eps) - _logsig(-beta * d) * eps
    if name == "aot_unpaired":
        d = np.sort(rw) - np.sort(rl)
        return -_logsig(beta * d) * (1 - eps) - _logsig(-beta * d) * eps
    if name == "apo_zero":
        return (1 - _sig(beta * rw)) + _sig(beta * rl)
    if name == "apo_down":
        return _sig(beta * rw) + (1 - _sig(beta * h))
    if name == "discopop":
        z = beta * h
        m = _sig(z / tau)
        return -_logsig(z) * (1 - m) + np.exp(-z) * m
    raise KeyError(name)


SMOOTHING = {"cdpo": 0.1, "robust": 0.2, "exo_pair": 0.05, "aot": 0.1, "aot_unpaired": 0.1}


def _inputs(seed, b=6, scale=20.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(4, b)) * scale - 60.0  # plausible summed log-probs
    lens = rng.integers(3, 40, size=(2, b)).astype(np.float64)
    return x, lens


@pytest.mark.parametrize("name", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_values_and_grads_match_numpy(name, beta):
    x, lens = _inputs(LOSS_TYPES.index(name))
    eps = SMOOTHING.get(name, 0.0)
    kw = dict(loss_type=name, beta=beta, label_smoothing=eps)
    if name == "ipo":
        kw.update(chosen_lengths=jnp.asarray(lens[0]), rejected_lengths=jnp.asarray(lens[1]))
    lc, lr = (lens[0], lens[1]) if name == "ipo" else (None, None)

    got, _ = dap_loss(*jnp.asarray(x, jnp.float32), **kw)
    want = np_loss(name, *x, beta, eps, lc=lc, lr=lr)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)

    # Gradient of the mean loss w.r.t. all four inputs vs central finite differences of the float64 reference.
    def mean_loss(arr):
        return jnp.mean(dap_loss(*arr, **kw)[0])

    g = np.asarray(jax.grad(mean_loss)(jnp.asarray(x, jnp.float32)))
    fd = np.zeros_like(x)
    step = 1e-5
    for idx in np.ndindex(*x.shape):
        hi, lo = x.copy(), x.copy()
        hi[idx] += step
        lo[idx] -= step
        f = functools.partial(np_loss, name, beta=beta, eps=eps, lc=lc, lr=lr)
        fd[idx] = (f(*hi).mean() - f(*lo).mean()) / (2 * step)
    if name == "bco_pair_batchmean":  # δ is held outside the gradient: remove its (batch-mean) path from the FD.
        fd = _bco_grad_with_stopped_delta(x, beta)
    np.testing.assert_allclose(g, fd, rtol=1e-3, atol=2e-5)


def _bco_grad_with_stopped_delta(x, beta):
    pc, pr, rc, rr = x
    rw, rl = pc - rc, pr - rr
    delta = np.concatenate([beta * rw, beta * rl]).mean()
    b = x.shape[1]
    dw = -beta * _sig(-(beta * rw - delta)) / b  # d/d rw of -logσ(βrw-δ), averaged
    dl = beta * _sig(beta * rl - delta) / b  # d/d rl of -logσ(-(βrl-δ)), averaged
    return np.stack([dw, dl, -dw, -dl])


def test_closed_forms():
    z = jnp.zeros(3)
    sig, _ = dap_loss(z, z, z, z, loss_type="sigmoid")
    np.testing.assert_allclose(sig, np.log(2.0), rtol=1e-6)
    hinge, _ = dap_loss(z, z, z, z, loss_type="hinge")
    np.testing.assert_allclose(hinge, 1.0)
    ipo, _ = dap_loss(z, z, z, z, loss_type="ipo", beta=0.1)
    np.testing.assert_allclose(ipo, 25.0, rtol=1e-6)  # (0 − 1/(2·0.1))²
    apo, _ = dap_loss(z, z, z, z, loss_type="apo_zero")
    np.testing.assert_allclose(apo, 1.0, rtol=1e-6)
    # SLiC is zero once βh ≥ 1: h = 10 with β = 0.1.
    one = jnp.ones(3)
    slic, _ = dap_loss(10 * one, z, z, z, loss_type="slic", beta=0.1)
    np.testing.assert_allclose(slic, 0.0, atol=1e-7)
    # IPO is zero at its target margin h = 1/(2β), here on length-averaged log-probs.
    ipo0, _ = dap_loss(50 * one, z, z, z, loss_type="ipo", beta=0.1, chosen_lengths=10 * one, rejected_lengths=one)
    np.testing.assert_allclose(ipo0, 0.0, atol=1e-6)


def test_cdpo_at_zero_smoothing_is_dpo_and_bco_shift_only_moves_the_boundary():
    x = jnp.asarray(_inputs(5)[0], jnp.float32)
    np.testing.assert_array_equal(dap_loss(*x, loss_type="cdpo")[0], dap_loss(*x, loss_type="sigmoid")[0])
    # With every reward equal to the batch mean (δ = that reward), the shifted form sits at its boundary: 2·log 2.
    pc = jnp.full(4, -5.0)
    got, _ = dap_loss(pc, pc, pc - 2.0, pc - 2.0, loss_type="bco_pair_batchmean", beta=0.5)
    np.testing.assert_allclose(got, 2 * np.log(2.0), rtol=1e-6)
    plain, _ = dap_loss(pc, pc, pc - 2.0, pc - 2.0, loss_type="bco_pair", beta=0.5)  # βr = 1 for both
    np.testing.assert_allclose(plain, -_logsig(1.0) - _logsig(-1.0), rtol=1e-6)


def test_aliases():
    x = jnp.asarray(_inputs(0)[0], jnp.float32)
    np.testing.assert_array_equal(dap_loss(*x, loss_type="dpo")[0], dap_loss(*x, loss_type="sigmoid")[0])
    np.testing.assert_array_equal(dap_loss(*x, loss_type="slic")[0], dap_loss(*x, loss_type="hinge")[0])


def test_metrics():
    pc, pr = jnp.array([-1.0, -2.0]), jnp.array([-3.0, -1.0])
    rc, rr = jnp.array([-2.0, -2.0]), jnp.array([-2.0, -2.0])
    _, m = dap_loss(pc, pr, rc, rr, beta=0.5)
    # r_w = [1, 0], r_l = [-1, 1]
    np.testing.assert_allclose(m["rewards/chosen"], 0.25)
    np.testing.assert_allclose(m["rewards/rejected"], 0.0)
    np.testing.assert_allclose(m["rewards/margins"], 0.25)
    np.testing.assert_allclose(m["rewards/accuracies"], 0.5)
    np.testing.assert_allclose(m["logratios/chosen"], 0.5)
    np.testing.assert_allclose(m["logratios/rejected"], 0.0)
    assert all(v.shape == () for v in m.values())


def test_swap_flips_margin_and_beta_scaling():
    x = jnp.asarray(_inputs(1)[0], jnp.float32)
    pc, pr, rc, rr = x
    _, m = dap_loss(pc, pr, rc, rr, beta=0.1)
    _, s = dap_loss(pr, pc, rr, rc, beta=0.1)
    np.testing.assert_allclose(s["rewards/margins"], -m["rewards/margins"], rtol=1e-5)
    _, m2 = dap_loss(pc, pr, rc, rr, beta=0.2)
    np.testing.assert_allclose(m2["rewards/margins"], 2 * m["rewards/margins"], rtol=1e-5)
    # DPO depends on (β, h) only through βh: (β, h) and (2β, h/2) agree.
    a, _ = dap_loss(pc, pr, rc, rr, beta=0.1)
    b, _ = dap_loss(pc / 2, pr / 2, rc / 2, rr / 2, beta=0.2)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    # Adding the same log-prob to chosen and rejected under both models changes nothing (DPO is a margin loss).
    c, _ = dap_loss(pc + 3, pr + 3, rc + 3, rr + 3, beta=0.1)
    np.testing.assert_allclose(a, c, rtol=1e-5)


@pytest.mark.parametrize("name", LOSS_TYPES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_no_nan_at_extreme_logratios(name, dtype):
    big = 1e4
    pc = jnp.array([big, -big, 0.0, big], dtype)
    pr = jnp.array([-big, big, 0.0, big], dtype)
    z = jnp.zeros(4, dtype)
    kw = dict(loss_type=name, label_smoothing=SMOOTHING.get(name, 0.0))
    loss, metrics = dap_loss(pc, pr, z, z, **kw)
    assert loss.dtype == jnp.float32 and loss.shape == (4,)
    assert not np.any(np.isnan(np.asarray(loss))), loss
    grads = jax.grad(lambda a, b: jnp.sum(dap_loss(a, b, z, z, **kw)[0]), argnums=(0, 1))(pc, pr)
    for g in grads:
        assert not np.any(np.isnan(np.asarray(g, np.float32))), grads
    assert all(np.isfinite(float(v)) for v in metrics.values())


def test_bfloat16_inputs_accumulate_in_float32():
    x, _ = _inputs(2)
    xb = jnp.asarray(x, jnp.bfloat16)
    got, _ = dap_loss(*xb)
    want = np_loss("sigmoid", *np.asarray(xb.astype(jnp.float32), np.float64), 0.1)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "aot", "bco_pair_batchmean", "discopop"])
def test_jit_grad_vmap(name):
    x, lens = _inputs(3)
    x = jnp.asarray(x, jnp.float32)
    kw = dict(loss_type=name, beta=0.1)
    f = jax.jit(lambda a, b, c, d, lc, lr: dap_loss(a, b, c, d, chosen_lengths=lc, rejected_lengths=lr, **kw)[0])
    eager = dap_loss(*x, chosen_lengths=lens[0], rejected_lengths=lens[1], **kw)[0]
    np.testing.assert_allclose(f(*x, lens[0], lens[1]), eager, rtol=1e-6)
    # vmap over a leading axis of independent batches equals a loop over them.
    stacked = jnp.stack([x, x[:, ::-1] * 0.5])  # [2, 4, B]
    vm = jax.vmap(lambda a: dap_loss(*a, **kw)[0])(stacked)
    for i in range(2):
        np.testing.assert_allclose(vm[i], dap_loss(*stacked[i], **kw)[0], rtol=1e-6)
    g = jax.jit(jax.grad(lambda a: jnp.mean(dap_loss(*a, **kw)[0])))(x)
    assert g.shape == x.shape and np.all(np.isfinite(g))


def test_traced_beta_under_jit():
    x = jnp.asarray(_inputs(4)[0], jnp.float32)
    f = jax.jit(lambda a, beta: dap_loss(*a, beta=beta)[0])
    np.testing.assert_allclose(f(x, 0.3), dap_loss(*x, beta=0.3)[0], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss_type="kto"), r"unknown loss_type 'kto'; valid choices: sigmoid, cdpo, hinge, ipo"),
        (dict(beta=0.0), "beta must be a finite number > 0"),
        (dict(beta=-1.0), "beta must be a finite number > 0"),
        (dict(beta=float("nan")), "beta must be a finite number > 0"),
        (dict(loss_type="robust", label_smoothing=0.5), r"robust needs 0 <= label_smoothing < 0.5"),
        (dict(loss_type="cdpo", label_smoothing=0.7), r"cdpo needs 0 <= label_smoothing <= 0.5"),
        (dict(loss_type="sigmoid", label_smoothing=0.1), r"no effect for loss_type 'sigmoid' .*loss_type 'cdpo'"),
        (dict(loss_type="bco_pair", label_smoothing=0.1), "has no effect for loss_type 'bco_pair'"),
        (dict(loss_type="hinge", label_smoothing=0.1), "has no effect for loss_type 'hinge'"),
        (dict(loss_type="exo_pair", label_smoothing=1.0), "exo_pair needs 0 <= label_smoothing < 1"),
        (dict(loss_type="discopop", discopop_tau=0.0), "discopop_tau must be > 0"),
        (dict(loss_type="ipo", chosen_lengths=jnp.ones(2)), "ipo needs both chosen_lengths and rejected_lengths"),
    ],
)
def test_errors(kwargs, match):
    z = jnp.zeros(2)
    with pytest.raises(ValueError, match=match):
        dap_loss(z, z, z, z, **kwargs)
