"""The rules the front ends and kernels share (`tensorglot.frontend`, `tensorglot.kernels`), on every backend.

These were once written per backend and disagreed: a ``dy`` of another dtype was cast by some backends
and refused by others; float32 attention whose scores overflow gave NaN on some and numbers on others.
"""

from __future__ import annotations

import numpy as np
import pytest

RNG = np.random.default_rng(7)
SHAPES = {"q": (1, 3, 2, 4), "k": (1, 3, 1, 4), "v": (1, 3, 1, 4)}
ATT = {name: RNG.standard_normal(shape) for name, shape in SHAPES.items()}

# (name, positional arrays before dy, dy's shape, keyword options)
BACKWARDS = [
    ("softmax_backward", [RNG.random((2, 3))], (2, 3), {}),
    ("linear_backward", [RNG.random((2, 3)), RNG.random((3, 4))], (2, 4), {"bias": True}),
    ("mlp_backward", [RNG.random((2, 3)), RNG.random((3, 5)), RNG.random((5, 3))], (2, 3), {}),
    ("swiglu_backward", [RNG.random((2, 3)), RNG.random((3, 5)), RNG.random((3, 5)), RNG.random((5, 3))], (2, 3), {}),
    ("rms_norm_backward", [RNG.random((2, 3)), RNG.random(3)], (2, 3), {}),
    ("attention_backward", [ATT["q"], ATT["k"], ATT["v"]], (1, 3, 2, 4), {"causal": True}),
]


@pytest.mark.parametrize("name,arrays,dy_shape,options", BACKWARDS, ids=[b[0] for b in BACKWARDS])
def test_backward_refuses_a_dy_of_another_dtype(backend, name, arrays, dy_shape, options):
    """One rule: every floating input of a call, dy included, has one dtype; nothing is cast silently."""
    other = next(d for d in ("float16", "float64", "bfloat16") if d in backend.capabilities)
    args = [backend.asarray(a, "float32") for a in arrays]
    dy = backend.asarray(np.ones(dy_shape), other)
    with pytest.raises(TypeError, match=rf"{name}: inputs must share one dtype.*dy={other}"):
        getattr(backend.ops, name)(*args, dy, **options)


def test_softmax_of_a_row_with_inf_maximum_shares_it(backend):
    """A row whose maximum is +inf gives its +inf entries equal weight (the limit), never NaN."""
    x = backend.asarray(np.array([[np.inf, 1.0, np.inf, -np.inf], [0.0, np.inf, 2.0, 3.0]]), "float32")
    got = backend.to_numpy(backend.ops.softmax(x))
    np.testing.assert_array_equal(got, [[0.5, 0.0, 0.5, 0.0], [0.0, 1.0, 0.0, 0.0]])


@pytest.mark.parametrize("value", [1e19, 1e20])
def test_attention_with_overflowing_scores_is_finite(backend, reference, value):
    """q = k = 1e19 or 1e20 in float32: the scores (q·scale)·kᵀ reach or pass float32's range (3.4e38).
    Every key then scores alike, so every backend gives the reference's uniform average of v."""
    q = np.full((1, 3, 2, 4), value)
    k = np.full((1, 3, 1, 4), value)
    v = RNG.standard_normal((1, 3, 1, 4))
    got = backend.to_numpy(backend.ops.attention(*(backend.asarray(a, "float32") for a in (q, k, v)), causal=True))
    want = reference.ops.attention(q, k, v, causal=True)  # float64: no overflow
    assert np.isfinite(got).all(), f"attention gave {got}"
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_numpy_scalars_are_options(backend):
    """Options given as NumPy scalars mean the numbers they hold."""
    x = backend.asarray(RNG.standard_normal((2, 3)), "float32")
    w = backend.asarray(np.ones(3), "float32")
    want = backend.to_numpy(backend.ops.rms_norm(x, w, eps=1e-5))
    got = backend.to_numpy(backend.ops.rms_norm(x, w, eps=np.float32(1e-5)))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(
        backend.to_numpy(backend.ops.softmax(x, axis=np.int64(0))), backend.to_numpy(backend.ops.softmax(x, axis=0))
    )
