"""The flash attention custom_vjp: jax.grad through it equals its explicit backward and the naive attention's
gradients, and it runs inside a jitted caller."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tensorglot

ops = tensorglot.get_backend("jax").ops


def _inputs(B=2, S=5, T=7, N=4, K=2, H=3, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(s), dtype=jnp.float32) for s in ((B, S, N, H), (B, T, K, H), (B, T, K, H))]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block_size", [3, 128])
def test_grad_equals_explicit_backward_and_naive(causal, block_size):
    q, k, v = _inputs()
    mask = jnp.asarray(np.random.default_rng(1).random((2, 1, 5, 7)) < 0.7)
    dy = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape), dtype=jnp.float32)

    def vjp(f):
        _, pullback = jax.vjp(lambda q, k, v: f(q, k, v, causal=causal, mask=mask), q, k, v)
        return pullback(dy)

    auto = vjp(lambda *a, **kw: ops.flash_attention(*a, **kw, block_size=block_size))
    explicit = ops.flash_attention_backward(q, k, v, dy, causal=causal, mask=mask, block_size=block_size)
    naive = vjp(ops.attention)
    for a, e, n in zip(auto, explicit, naive):
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(a, n, rtol=1e-4, atol=1e-5)


def test_runs_inside_a_jitted_caller():
    q, k, v = _inputs(S=6, T=4)

    @jax.jit
    def loss(q, k, v):
        return jnp.sum(ops.flash_attention(q, k, v, causal=True, block_size=4) ** 2)

    value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)
    expected = jnp.sum(ops.attention(q, k, v, causal=True) ** 2)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    assert np.all(np.asarray(grads[0])[:, :2] == 0.0)  # causal with S > T: the first two queries see nothing


def test_traced_block_size_is_refused_naming_the_option():
    q, k, v = _inputs()
    with pytest.raises(
        TypeError, match=r"flash_attention: block_size is an option .* static_argnames=\('block_size',\)"
    ):
        jax.jit(lambda q, bs: ops.flash_attention(q, k, v, block_size=bs))(q, 4)


def test_kernel_traces_under_jit_with_the_options_static():
    """The kernel the front end calls is jitted with its options static: inside a caller's jit it inlines."""
    q, k, v = _inputs()
    kernel = tensorglot.get_backend("jax").kernels.flash_attention
    got = jax.jit(lambda q, k, v: kernel(q, k, v, True, None, 0.5, 3))(q, k, v)
    np.testing.assert_allclose(got, ops.attention(q, k, v, causal=True, scale=0.5), rtol=1e-5, atol=1e-6)
