"""The conformance suite catches real mistakes: deliberately wrong backends must fail it.

Each fake backend is the NumPy reference with one function replaced by a classic bug. The suite runs
in a subprocess (pytester) with the fake registered through a ``-p`` plugin, exactly as a third-party
backend would be found.
"""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

FAKES = """
import types
import numpy as np
from tensorglot.hookspecs import hookimpl
from tensorglot.registry import registry
from tensorglot.encodings import Encodings
from tensorglot.ops import Ops
from tensorglot_numpy.backend import NumpyBackend

REF = NumpyBackend.kernels


def softmax(x, axis):
    e = np.exp(x)  # bug: no max subtraction, overflows for large inputs
    return e / e.sum(axis=axis, keepdims=True)


def rope(x, positions, inv_freq, mscale, sign, style, rotary_dim):
    swapped = "neox" if style == "interleaved" else "interleaved"  # bug: the other pairing
    return REF.rope(x, positions, inv_freq, mscale, sign, swapped, rotary_dim)


def rms_norm_backward(x, weight, dy, eps, offset):
    dx, dw = REF.rms_norm_backward(x, weight, dy, eps, offset)
    return -dx, dw  # bug: a sign error


def make(name, **replaced):
    # The reference with one kernel replaced: the spec front ends then run the buggy kernel.
    backend = NumpyBackend()
    backend.name = name
    backend.kernels = types.SimpleNamespace(**(vars(REF) | replaced))
    backend.ops, backend.encodings = Ops(backend), Encodings(backend)
    return backend


class Fakes:
    @hookimpl
    def tensorglot_register_backends(self, register):
        caps = {"float64", "float16"}
        register("bad-softmax", lambda: make("bad-softmax", softmax=softmax), capabilities=caps)
        register("bad-rope", lambda: make("bad-rope", rope=rope), capabilities=caps)
        register("bad-backward", lambda: make("bad-backward", rms_norm_backward=rms_norm_backward), capabilities=caps)


registry().register_plugin(Fakes(), name="fakes", distribution="tests")
"""


@pytest.fixture
def run_suite(pytester):
    pytester.makepyfile(fakes=FAKES)
    pytester.syspathinsert()

    def run(backend: str, selection: str):
        return pytester.runpytest_subprocess(
            "-p",
            "fakes",
            "--pyargs",
            "tensorglot.conformance",
            "--backend",
            backend,
            "-k",
            selection,
            "-p",
            "no:cacheprovider",
            "-q",
            timeout=300,
        )

    return run


def _failed(result) -> set[str]:
    return {line.split()[1] for line in result.outlines if line.startswith("FAILED ")}


def test_softmax_without_max_subtraction_fails(run_suite):
    result = run_suite("bad-softmax", "softmax")
    failed = _failed(result)
    assert result.ret == 1
    assert any("test_softmax_large_inputs_do_not_overflow" in f for f in failed), failed
    assert any("test_softmax_rows_sum_to_one_and_shift_invariant" in f for f in failed), failed


def test_rope_with_the_wrong_pairing_fails(run_suite):
    result = run_suite("bad-rope", "rope or neox")
    failed = _failed(result)
    assert result.ret == 1
    assert any("test_forward_matches_reference[float32-rope-interleaved]" in f for f in failed), failed
    assert any("test_interleaved_and_neox_agree_under_permutation" in f for f in failed), failed


def test_backward_with_a_sign_error_fails(run_suite):
    result = run_suite("bad-backward", "rms_norm")
    failed = _failed(result)
    assert result.ret == 1
    assert any("test_backward_matches_central_differences[rms_norm]" in f for f in failed), failed
    assert any("test_backward_matches_reference[float64-rms_norm]" in f for f in failed), failed
    # The forward pass is right, and the suite says so.
    assert not any("test_forward_matches_reference[" in f for f in failed), failed


def test_the_reference_passes_the_same_selection(run_suite):
    result = run_suite("numpy", "softmax or rope or rms_norm")
    assert result.ret == 0, "\n".join(result.outlines[-20:])


def test_unmatched_xfail_entry_warns_and_reasonless_entry_is_refused(run_suite, pytester):
    xfails = pytester.path / "xfails.txt"
    xfails.write_text(
        "test_ops.py::test_forward_matches_reference[float32-softmax-last]  # known\nno_such_test*  # stale\n"
    )
    result = pytester.runpytest_subprocess(
        "--pyargs",
        "tensorglot.conformance",
        "--backend",
        "numpy",
        "-k",
        "softmax-last",
        "--xfails",
        str(xfails),
        "-p",
        "no:cacheprovider",
        "-q",
        timeout=300,
    )
    text = "\n".join(result.outlines)
    assert "entry 'no_such_test*' matches no test" in text
    assert result.parseoutcomes().get("xpassed") == 1  # the listed test passes on the reference: XPASS
    xfails.write_text("test_ops.py::*  \n")
    refused = pytester.runpytest_subprocess(
        "--pyargs",
        "tensorglot.conformance",
        "--backend",
        "numpy",
        "--xfails",
        str(xfails),
        "-p",
        "no:cacheprovider",
        timeout=300,
    )
    assert refused.ret != 0 and "needs a reason" in "\n".join(refused.errlines + refused.outlines)
