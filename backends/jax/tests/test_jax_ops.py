"""The JAX backend's own tests: custom VJPs against finite differences, and jit / vmap / grad."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import tensorglot

be = tensorglot.get_backend("jax")
ref = tensorglot.get_backend("numpy")
ops, enc = be.ops, be.encodings


def _rand(*shape, seed=0, dtype=jnp.float64):
    return jnp.asarray(np.random.default_rng(seed + len(shape)).standard_normal(shape), dtype=dtype)


def _cases():
    """(name, f, arg shapes): each f is a public op with its options closed over."""
    mask = np.random.default_rng(1).random((2, 1, 3, 5)) > 0.3
    mask[..., 0] = True
    return [
        ("softmax", lambda x: ops.softmax(x, axis=1), [(3, 4, 5)]),
        ("linear", lambda x, w, b: ops.linear(x, w, b), [(2, 3, 4), (4, 5), (5,)]),
        ("linear_nobias", lambda x, w: ops.linear(x, w), [(3, 4), (4, 2)]),
        *[
            (f"mlp_{a}", lambda x, wi, wo, a=a: ops.mlp(x, wi, wo, activation=a), [(2, 3, 4), (4, 6), (6, 4)])
            for a in ("relu", "gelu", "gelu_tanh", "silu")
        ],
        ("swiglu", ops.swiglu, [(2, 3, 4), (4, 6), (4, 6), (6, 4)]),
        ("geglu", ops.geglu, [(2, 3, 4), (4, 6), (4, 6), (6, 4)]),
        ("rms_norm", lambda x, w: ops.rms_norm(x, w, eps=1e-5), [(2, 3, 8), (8,)]),
        ("rms_norm_offset", lambda x, w: ops.rms_norm(x, w, eps=1e-5, offset=1.0), [(2, 3, 8), (8,)]),
        (
            "attention_gqa_causal",
            lambda q, k, v: ops.attention(q, k, v, causal=True),
            [(2, 3, 4, 4), (2, 5, 2, 4), (2, 5, 2, 4)],
        ),
        (
            "attention_mask",
            lambda q, k, v: ops.attention(q, k, v, mask=jnp.asarray(mask), scale=0.3),
            [(2, 3, 4, 4), (2, 5, 1, 4), (2, 5, 1, 4)],
        ),
        (
            "attention_window_softcap",
            lambda q, k, v: ops.attention(q, k, v, causal=True, window=2, softcap=0.8),
            [(2, 3, 4, 4), (2, 5, 2, 4), (2, 5, 2, 4)],
        ),
        (
            "flash_window_softcap",
            lambda q, k, v: ops.flash_attention(q, k, v, causal=True, window=3, softcap=1.2, block_size=2),
            [(1, 7, 2, 4), (1, 7, 1, 4), (1, 7, 1, 4)],
        ),
        (
            "rope_interleaved",
            lambda x: enc.rope(x, positions=jnp.array([3, 1, 4]), theta=100.0),
            [(2, 3, 2, 6)],
        ),
        ("rope_neox_partial", lambda x: enc.rope(x, style="neox", rotary_dim=4), [(2, 3, 2, 6)]),
    ]


CASES = _cases()


@pytest.mark.parametrize(("name", "f", "shapes"), CASES, ids=[c[0] for c in CASES])
def test_custom_vjp_agrees_with_finite_differences(name, f, shapes):
    with jax.enable_x64(True):
        args = [_rand(*s, seed=i) for i, s in enumerate(shapes)]
        check_grads(f, args, order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("name", "f", "shapes"), CASES, ids=[c[0] for c in CASES])
def test_jit_vmap_and_grad_compose(name, f, shapes):
    args = [_rand(*s, seed=i, dtype=jnp.float32) for i, s in enumerate(shapes)]
    eager = f(*args)
    np.testing.assert_allclose(jax.jit(f)(*args), eager, rtol=1e-6, atol=1e-6)
    # vmap over a new leading axis of the first input: each slice is the op on that slice
    stacked = jnp.stack([args[0], 2 * args[0]])
    batched = jax.vmap(lambda a: f(a, *args[1:]))(stacked)
    np.testing.assert_allclose(batched[1], f(2 * args[0], *args[1:]), rtol=1e-5, atol=1e-5)
    loss = lambda *a: jnp.sum(f(*a) ** 2)  # noqa: E731
    grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*args)
    assert [g.shape for g in grads] == [a.shape for a in args]
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


def _backward_cases():
    """(name, forward with its options closed over, its explicit backward: (*inputs, dy) -> gradients)."""
    mask = jnp.asarray(np.random.default_rng(1).random((2, 4, 3, 5)) > 0.3)  # per query head
    att = {"causal": True, "mask": mask, "scale": 0.3}
    rope = {"positions": jnp.array([[3, 1, 4], [1, 5, 9]]), "theta": 100.0, "style": "neox", "rotary_dim": 4}
    return [
        (
            "softmax",
            lambda x: ops.softmax(x, axis=1),
            lambda x, dy: (ops.softmax_backward(ops.softmax(x, axis=1), dy, axis=1),),
            [(3, 4, 5)],
        ),
        ("linear", ops.linear, lambda x, w, b, dy: ops.linear_backward(x, w, dy, bias=True), [(2, 3, 4), (4, 5), (5,)]),
        *[
            (
                f"mlp_{a}",
                lambda x, wi, wo, a=a: ops.mlp(x, wi, wo, activation=a),
                lambda x, wi, wo, dy, a=a: ops.mlp_backward(x, wi, wo, dy, activation=a),
                [(2, 3, 4), (4, 6), (6, 4)],
            )
            for a in ("relu", "gelu", "gelu_tanh", "silu")
        ],
        ("swiglu", ops.swiglu, ops.swiglu_backward, [(2, 3, 4), (4, 6), (4, 6), (6, 4)]),
        ("geglu", ops.geglu, ops.geglu_backward, [(2, 3, 4), (4, 6), (4, 6), (6, 4)]),
        (
            "rms_norm_offset",
            lambda x, w: ops.rms_norm(x, w, offset=1.0),
            lambda x, w, dy: ops.rms_norm_backward(x, w, dy, offset=1.0),
            [(2, 3, 8), (8,)],
        ),
        (
            "rms_norm",
            lambda x, w: ops.rms_norm(x, w, eps=1e-5),
            lambda x, w, dy: ops.rms_norm_backward(x, w, dy, eps=1e-5),
            [(2, 3, 8), (8,)],
        ),
        (
            "attention",
            lambda q, k, v: ops.attention(q, k, v, **att),
            lambda q, k, v, dy: ops.attention_backward(q, k, v, dy, **att),
            [(2, 3, 4, 4), (2, 5, 2, 4), (2, 5, 2, 4)],
        ),
        (
            "attention_window_softcap",
            lambda q, k, v: ops.attention(q, k, v, **att, window=2, softcap=0.8),
            lambda q, k, v, dy: ops.attention_backward(q, k, v, dy, **att, window=2, softcap=0.8),
            [(2, 3, 4, 4), (2, 5, 2, 4), (2, 5, 2, 4)],
        ),
        (
            "flash_window_softcap",
            lambda q, k, v: ops.flash_attention(q, k, v, **att, window=2, softcap=0.8, block_size=2),
            lambda q, k, v, dy: ops.flash_attention_backward(q, k, v, dy, **att, window=2, softcap=0.8, block_size=2),
            [(2, 3, 4, 4), (2, 5, 2, 4), (2, 5, 2, 4)],
        ),
        ("rope", lambda x: enc.rope(x, **rope), lambda x, dy: (enc.rope_backward(dy, **rope),), [(2, 3, 2, 6)]),
    ]


BACKWARDS = _backward_cases()


@pytest.mark.parametrize(("name", "f", "backward", "shapes"), BACKWARDS, ids=[c[0] for c in BACKWARDS])
def test_grad_through_the_custom_vjp_is_the_explicit_backward(name, f, backward, shapes):
    """jax.vjp through the public op, jitted, runs the formula of the op's explicit backward (eager)."""
    args = [_rand(*s, seed=i, dtype=jnp.float32) for i, s in enumerate(shapes)]
    dy = _rand(*f(*args).shape, seed=9, dtype=jnp.float32)
    got = jax.jit(lambda *a: jax.vjp(f, *a)[1](dy))(*args)
    want = backward(*args, dy)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == jnp.float32
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_returns_its_dtype_and_matches_float32(dtype):
    x, w = _rand(4, 16, dtype=jnp.float32), _rand(16, dtype=jnp.float32)
    half = ops.rms_norm(x.astype(dtype), w.astype(dtype))
    assert half.dtype == dtype
    full = ops.rms_norm(x.astype(dtype).astype(jnp.float32), w.astype(dtype).astype(jnp.float32))
    np.testing.assert_allclose(half.astype(jnp.float32), full, rtol=2e-2, atol=2e-2)
    g = jax.grad(lambda a: jnp.sum(ops.softmax(a) * a).astype(jnp.float32))(x.astype(dtype))
    assert g.dtype == dtype


def test_fully_masked_query_gives_zeros_and_no_gradient():
    q, k, v = (_rand(1, s, 1, 4, seed=i, dtype=jnp.float32) for i, s in enumerate((2, 3, 3)))
    mask = jnp.array([[True, True, False], [False, False, False]])  # query 1 sees nothing
    out = ops.attention(q, k, v, mask=mask)
    np.testing.assert_array_equal(out[0, 1], 0.0)
    dq = jax.grad(lambda a: jnp.sum(ops.attention(a, k, v, mask=mask)))(q)
    np.testing.assert_array_equal(dq[0, 1], 0.0)
    assert bool(jnp.all(jnp.isfinite(dq)))


def test_traced_option_raises_a_clear_error():
    x, w = jnp.ones((2, 4)), jnp.ones(4)
    with pytest.raises(TypeError, match=r"rms_norm: eps is an option and must be a static Python value"):
        jax.jit(lambda x, eps: ops.rms_norm(x, w, eps=eps))(x, 1e-6)
    with pytest.raises(TypeError, match=r"attention: causal .* static_argnames=\('causal',\)"):
        jax.jit(lambda q, c: ops.attention(q, q, q, causal=c))(jnp.ones((1, 2, 1, 4)), True)
    with pytest.raises(TypeError, match=r"softmax: axis is an option"):
        jax.jit(lambda x, a: ops.softmax(x, axis=a))(x, 0)
    with pytest.raises(TypeError, match=r"rope: rotary_dim is an option"):
        jax.jit(lambda q, r: enc.rope(q, rotary_dim=r))(jnp.ones((1, 2, 1, 4)), 2)
    # marked static, the same call compiles
    f = jax.jit(lambda x, eps: ops.rms_norm(x, w, eps=eps), static_argnames="eps")
    assert f(x, eps=1e-6).shape == (2, 4)


def test_bad_shapes_raise_at_trace_time_naming_the_op():
    q, kv = jnp.ones((1, 2, 3, 4)), jnp.ones((1, 2, 2, 4))
    with pytest.raises(ValueError, match=r"attention: q has N = 3 heads and k has K = 2; N % K must be 0"):
        jax.jit(ops.attention).lower(q, kv, kv)
    with pytest.raises(ValueError, match=r"rms_norm: weight has shape \(3,\), wanted \(4,\)"):
        jax.eval_shape(ops.rms_norm, jnp.ones((2, 4)), jnp.ones(3))


def test_padding_mask_checks_concrete_lengths_and_accepts_traced_ones():
    with pytest.raises(ValueError, match=r"padding_mask: lengths must lie in \[0, 3\]"):
        ops.padding_mask(jnp.array([1, 4]), 3)
    traced = jax.jit(lambda n: ops.padding_mask(n, 3))(jnp.array([1, 3]))
    np.testing.assert_array_equal(traced, ref.ops.padding_mask(np.array([1, 3]), 3))


def test_float64_needs_x64_and_says_how():
    if jax.config.read("jax_enable_x64"):
        pytest.skip("this process runs with x64 on (JAX_ENABLE_X64)")
    assert "float64" not in be.capabilities
    with pytest.raises(TypeError, match="JAX_ENABLE_X64=1"):
        be.asarray(np.ones(2), "float64")
    with jax.enable_x64(True):
        assert "float64" in be.capabilities
        assert be.dtype_name(be.asarray(np.ones(2), "float64")) == "float64"


def test_plugin_imports_no_jax_and_declares_float64_only_with_x64():
    code = (
        "import sys, tensorglot_jax.plugin as p; "
        "assert 'jax' not in sys.modules; print(sorted(p.CAPABILITIES), p.x64_requested())"
    )
    for env, x64 in (({"JAX_ENABLE_X64": "1"}, "True"), ({"JAX_ENABLE_X64": "0"}, "False")):
        cmd = [sys.executable, "-c", code]
        out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, check=True)
        assert out.stdout.strip().endswith(x64), out.stdout + out.stderr
