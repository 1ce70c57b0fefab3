"""TENSORGLOT_XP_NAMESPACE picks the namespace the xp backend creates arrays in; the kernels follow the inputs."""

from __future__ import annotations

import os
import subprocess
import sys

import array_api_compat.numpy as xnp
import array_api_strict
import numpy as np
import pytest
from array_api_compat import array_namespace

from tensorglot_xp.backend import XpBackend
from tensorglot_xp.plugin import declared_capabilities

RNG = np.random.default_rng(0)


def _run(code: str, namespace: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORGLOT_")}
    if namespace is not None:
        env["TENSORGLOT_XP_NAMESPACE"] = namespace
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize(
    "namespace,module,array_type",
    [(None, "array_api_strict", "Array"), ("numpy", "array_api_compat.numpy", "ndarray")],
)
def test_the_variable_is_read_when_the_backend_loads(namespace, module, array_type):
    code = (
        "import sys, numpy as np, tensorglot\n"
        "listed = 'array_api_strict' in sys.modules\n"  # listing backends imports no namespace
        "caps = tensorglot.registry.registry().infos()['xp'].capabilities\n"
        "be = tensorglot.get_backend('xp')\n"
        "y = be.ops.softmax(be.asarray(np.zeros((2, 2)), 'float32'))\n"
        "print(listed, be.xp.__name__, type(y).__name__, sorted(caps) == sorted(be.capabilities))\n"
    )
    assert _run(code, namespace).split() == ["False", module, array_type, "True"]


@pytest.mark.parametrize("namespace", ["array_api_strict", "numpy"])
def test_declared_capabilities_are_the_namespaces(namespace):
    be = XpBackend(namespace)
    assert be.capabilities == declared_capabilities(namespace)
    assert ("float16" in be.capabilities) == (namespace == "numpy")  # the standard has no half precision
    assert "bfloat16" not in be.capabilities


def test_both_namespaces_compute_the_same_values():
    strict, numpy = XpBackend("array_api_strict"), XpBackend("numpy")
    assert strict.xp is array_api_strict and numpy.xp is xnp
    q, k, v = RNG.standard_normal((1, 5, 4, 8)), RNG.standard_normal((1, 5, 2, 8)), RNG.standard_normal((1, 5, 2, 8))
    mask = RNG.random((1, 1, 5, 5)) < 0.7

    def run(be):
        args = [be.asarray(a, "float64") for a in (q, k, v)]
        out = be.ops.flash_attention(*args, causal=True, mask=be.asarray(mask, "bool"), block_size=2)
        eye = be.asarray(np.eye(8), "float64")
        gelu = be.ops.mlp(args[0], eye, eye, activation="gelu")
        return be.to_numpy(out), be.to_numpy(be.encodings.rope(args[0], style="neox", rotary_dim=4)), be.to_numpy(gelu)

    for a, b in zip(run(strict), run(numpy)):
        assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
        np.testing.assert_array_equal(a, b)


def test_conversions_round_trip():
    be = XpBackend("array_api_strict")
    for x, dtype in [(RNG.standard_normal((2, 3)), "float32"), (np.array([True, False]), "bool")]:
        y = be.asarray(x, dtype)
        assert array_namespace(y) is array_api_strict and be.dtype_name(y) == dtype
        np.testing.assert_array_equal(be.to_numpy(y), x.astype(dtype))


def test_a_dtype_the_namespace_lacks_is_refused_by_name():
    with pytest.raises(TypeError, match=r"asarray: the xp backend on array_api_strict has no dtype 'float16'"):
        XpBackend("array_api_strict").asarray(np.zeros(2), "float16")


def test_an_unknown_namespace_is_refused_by_name():
    with pytest.raises(ValueError, match=r"TENSORGLOT_XP_NAMESPACE: cannot import the array namespace 'nope'"):
        XpBackend("nope")
