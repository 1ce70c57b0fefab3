"""Every op and encoding against the reference, and every ``*_backward`` against central differences."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from ._cases import CASES, Case
from ._harness import assert_close, central_differences

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


def _rng(case: Case) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(case.id.encode()))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_forward_matches_reference(case, harness, dtype):
    args, kwargs = case.make(_rng(case))
    out = harness.call(case.namespace, case.fn, args, kwargs, dtype)
    assert harness.backend.dtype_name(out) == dtype, f"{case.fn} must return the input dtype {dtype}"
    # The reference computes in float64 on the values the backend saw (the inputs rounded to dtype).
    expected = harness.call_ref(case.namespace, case.fn, args, kwargs, dtype)
    assert_close(harness.get(out), expected, dtype, scale=case.scale, what=f"{case.id} forward")


def _backend_grads(harness, case, args, kwargs, dtype, dy):
    ns = getattr(harness.backend, case.namespace)
    put_args = [harness.put(a, dtype) for a in args]
    put_kwargs = {k: harness.put(v, dtype) for k, v in kwargs.items()}
    y = getattr(ns, case.fn)(*put_args, **put_kwargs)
    grads = case.backward(lambda n: getattr(ns, n), put_args, put_kwargs, y, harness.put(dy, dtype))
    return [harness.get(g) for g in grads]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_backward_matches_reference(case, harness, dtype):
    rng = _rng(case)
    args, kwargs = case.make(rng)
    y_ref = harness.ref(case.namespace, case.fn)(*args, **kwargs)
    dy = rng.standard_normal(np.shape(y_ref))
    grads = _backend_grads(harness, case, args, kwargs, dtype, dy)
    ref_ns = getattr(harness.reference, case.namespace)
    r_args = [harness.rounded(a, dtype) for a in args]
    r_kwargs = {k: harness.rounded(v, dtype) for k, v in kwargs.items()}
    y = getattr(ref_ns, case.fn)(*r_args, **r_kwargs)
    expected = case.backward(lambda n: getattr(ref_ns, n), r_args, r_kwargs, y, harness.rounded(dy, dtype))
    assert len(grads) == len(case.wrt)
    for i, (g, e) in enumerate(zip(grads, expected)):
        # Gradients chain one more reduction than the forward pass.
        assert_close(g, e, dtype, scale=2 * case.scale, what=f"{case.id} gradient {i}")


@pytest.mark.requires("float64")
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_backward_matches_central_differences(case, harness):
    rng = _rng(case)
    args, kwargs = case.make(rng)
    ns = getattr(harness.backend, case.namespace)
    kw = {k: harness.put(v, "float64") for k, v in kwargs.items()}

    def forward(inputs):
        return harness.get(getattr(ns, case.fn)(*(harness.put(a, "float64") for a in inputs), **kw))

    dy = rng.standard_normal(forward(args).shape)
    numeric = central_differences(forward, [np.array(a, copy=True) for a in args], dy, case.wrt)
    analytic = _backend_grads(harness, case, args, kwargs, "float64", dy)
    for i, (a, n) in enumerate(zip(analytic, numeric)):
        np.testing.assert_allclose(
            a, n, rtol=1e-5, atol=1e-7, err_msg=f"{case.id}: gradient {i} vs central differences"
        )
