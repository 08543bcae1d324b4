"""Token/sequence log-probs against a naive float64 log_softmax gather, and the memory claim."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bpo_jax.logprobs import reduce_masked, sequence_logprobs, token_logprobs


def _naive(logits, tokens, mask):
    lg = np.asarray(logits, np.float64)
    lsm = lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lg.max(-1, keepdims=True)
    tok = np.take_along_axis(lsm[:, :-1], np.asarray(tokens)[:, 1:, None], axis=-1)[..., 0]
    m = np.asarray(mask, np.float64)[:, 1:]
    s = (tok * m).sum(-1)
    return tok, s, s / np.maximum(m.sum(-1), 1)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-5)])
def test_matches_naive_gather(dtype, tol):
    rng = np.random.default_rng(0)
    b, t, v = 3, 7, 50
    logits = jnp.asarray(rng.normal(size=(b, t, v)) * 4, dtype)
    tokens = jnp.asarray(rng.integers(0, v, size=(b, t)), jnp.int32)
    mask = jnp.asarray([[0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]], jnp.int32)
    tok, s, mean = _naive(np.asarray(logits.astype(jnp.float32)), tokens, mask)
    got = sequence_logprobs(logits, tokens, mask)
    np.testing.assert_allclose(token_logprobs(logits[:, :-1], tokens[:, 1:]), tok, rtol=tol, atol=tol)
    np.testing.assert_allclose(got.sum, s, rtol=tol, atol=tol)
    np.testing.assert_allclose(got.mean, mean, rtol=tol, atol=tol)
    np.testing.assert_array_equal(got.count, [3, 6, 0])
    assert got.sum.dtype == jnp.float32
    assert float(got.mean[2]) == 0.0  # empty mask: mean 0, not NaN


def test_gradient_is_softmax_minus_onehot():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(2, 5, 11)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 11, size=(2, 5)), jnp.int32)
    mask = jnp.ones((2, 5), jnp.int32)
    g = jax.grad(lambda lg: jnp.sum(sequence_logprobs(lg, tokens, mask).sum))(logits)
    want = np.zeros((2, 5, 11))
    sm = np.asarray(jax.nn.softmax(logits[:, :-1]))
    want[:, :-1] = -sm
    for i in range(2):
        for j in range(4):
            want[i, j, int(tokens[i, j + 1])] += 1.0
    np.testing.assert_allclose(g, want, atol=1e-6)


def test_reduce_masked_vmap_and_jit():
    x = jnp.arange(12.0).reshape(3, 4)
    m = jnp.array([[1, 1, 0, 0], [0, 0, 0, 1], [1, 1, 1, 1]])
    out = jax.jit(jax.vmap(reduce_masked))(x, m)
    np.testing.assert_allclose(out.sum, [1.0, 7.0, 38.0])
    np.testing.assert_allclose(out.mean, [0.5, 7.0, 9.5])


def _naive_seq_logprobs(lg, tk, m):
    lsm = jax.nn.log_softmax(lg.astype(jnp.float32)[:, :-1])
    return jnp.sum(jnp.take_along_axis(lsm, tk[:, 1:, None], -1)[..., 0] * m[:, 1:], -1)


def _temp_bytes(fn, dtype, b=4, t=64, v=4096):
    args = (jax.ShapeDtypeStruct((b, t, v), dtype), *[jax.ShapeDtypeStruct((b, t), jnp.int32)] * 2)
    mem = jax.jit(fn).lower(*args).compile().memory_analysis()
    if mem is None:
        pytest.skip("this backend reports no memory analysis")
    return mem.temp_size_in_bytes


def test_forward_builds_no_extra_float32_bvt_buffers():
    """XLA's temp memory for the forward: none of [B, T, V] size for float32 logits (a naive log_softmax
    gather needs two), and for bfloat16 logits at most the one float32 copy the CPU backend makes to do
    bfloat16 arithmetic in float32 (TPU/GPU fuse that upcast into the reductions)."""
    f32_bvt = 4 * 64 * 4096 * 4
    ours = lambda lg, tk, m: sequence_logprobs(lg, tk, m).sum  # noqa: E731
    assert _temp_bytes(ours, jnp.float32) < f32_bvt // 8
    assert _temp_bytes(_naive_seq_logprobs, jnp.float32) > f32_bvt  # the measurement can see such buffers
    assert _temp_bytes(ours, jnp.bfloat16) < 1.1 * f32_bvt


def _unembed(w, h):
    return jnp.einsum("btd,dv->btv", h, w)


@pytest.mark.parametrize("chunk", [0, 1, 3, 5, 16])
def test_chunked_logprobs_equal_unchunked_values_and_gradients(chunk):
    """Any chunk size (a divisor of T or not, or none) gives the same log-probs and the same gradients with
    respect to the hidden states and the unembedding."""
    from bpo_jax.logprobs import chunked_token_logprobs

    rng = np.random.default_rng(1)
    b, t, d, v = 2, 10, 8, 40
    h = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    tg = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    wts = jnp.asarray(rng.normal(size=(b, t)), jnp.float32)
    want = token_logprobs(_unembed(w, h), tg)
    np.testing.assert_allclose(chunked_token_logprobs(_unembed, w, h, tg, chunk), want, rtol=1e-6, atol=1e-6)
    f = lambda fn: lambda w_, h_: jnp.sum(wts * fn(w_, h_))  # noqa: E731
    g_want = jax.grad(f(lambda w_, h_: token_logprobs(_unembed(w_, h_), tg)), argnums=(0, 1))(w, h)
    g_got = jax.grad(f(lambda w_, h_: chunked_token_logprobs(_unembed, w_, h_, tg, chunk)), argnums=(0, 1))(w, h)
    for a, e in zip(g_got, g_want):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)


def test_chunked_logprobs_never_hold_the_whole_logits_in_forward_or_backward():
    """XLA's temporary memory for value-and-grad: unchunked it holds several [B, T, V] float32 buffers; chunked
    (8 of 256 positions) it stays under one of them."""
    from bpo_jax.logprobs import chunked_token_logprobs

    b, t, d, v = 2, 256, 16, 8192
    whole = b * t * v * 4
    h = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, v), jnp.float32)
    tg = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def temp(chunk):
        fn = jax.jit(jax.value_and_grad(lambda w_, h_, t_: jnp.sum(chunked_token_logprobs(_unembed, w_, h_, t_,
                                                                                              chunk)), (0, 1)))
        return fn.lower(w, h, tg).compile().memory_analysis().temp_size_in_bytes

    full, chunked = temp(0), temp(8)
    assert full >= 1.9 * whole and chunked < whole / 4, (full / whole, chunked / whole)  # measured: 2.0 and 0.1
