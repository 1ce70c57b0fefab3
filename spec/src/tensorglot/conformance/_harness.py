"""Shared machinery of the suite: tolerances, conversions, and the two oracles (reference, differences)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

#: (rtol, atol) against the float64 reference. Looser only where an op's conditioning says so: the
#: cases pass a ``scale`` with the reason written beside it.
TOLERANCES = {
    "float64": (1e-9, 1e-11),
    "float32": (1e-5, 1e-6),
    "float16": (1e-3, 1e-3),
    "bfloat16": (1.6e-2, 1e-2),
}

#: The capability a dtype needs; float32 needs none.
DTYPE_CAPABILITY = {"float64": "float64", "float16": "float16", "bfloat16": "bfloat16"}


def assert_close(actual: Any, expected: Any, dtype: str, *, scale: float = 1.0, what: str = "") -> None:
    """``|actual − expected| <= scale·(atol + rtol·|expected|)`` elementwise, NaN matching NaN."""
    rtol, atol = TOLERANCES[dtype]
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != expected {expected.shape}"
    np.testing.assert_allclose(
        actual,
        expected,
        rtol=rtol * scale,
        atol=atol * scale,
        equal_nan=True,
        err_msg=f"{what} ({dtype}, tolerance ×{scale})",
    )


class Harness:
    """Calls one backend and the reference on the same values."""

    def __init__(self, backend: Any, reference: Any) -> None:
        self.backend = backend
        self.reference = reference

    def fn(self, namespace: str, name: str) -> Callable[..., Any]:
        return getattr(getattr(self.backend, namespace), name)

    def ref(self, namespace: str, name: str) -> Callable[..., Any]:
        return getattr(getattr(self.reference, namespace), name)

    def put(self, x: Any, dtype: str) -> Any:
        """A float64 NumPy array to the backend in ``dtype``; ints and bools keep their dtype."""
        if isinstance(x, np.ndarray):
            if x.dtype.kind == "f":
                return self.backend.asarray(x, dtype)
            return self.backend.asarray(x, str(x.dtype))
        return x

    def get(self, x: Any) -> np.ndarray:
        return np.asarray(self.backend.to_numpy(x), dtype=np.float64)

    def rounded(self, x: Any, dtype: str) -> Any:
        """The float64 value of x after rounding to ``dtype``: the reference sees what the backend sees."""
        if isinstance(x, np.ndarray) and x.dtype.kind == "f":
            return self.get(self.backend.asarray(x, dtype))
        return x

    def call(self, namespace: str, name: str, args: Sequence[Any], kwargs: dict[str, Any], dtype: str) -> Any:
        return self.fn(namespace, name)(
            *(self.put(a, dtype) for a in args), **{k: self.put(v, dtype) for k, v in kwargs.items()}
        )

    def call_ref(self, namespace: str, name: str, args: Sequence[Any], kwargs: dict[str, Any], dtype: str) -> Any:
        return self.ref(namespace, name)(
            *(self.rounded(a, dtype) for a in args), **{k: self.rounded(v, dtype) for k, v in kwargs.items()}
        )


def central_differences(
    f: Callable[[list[np.ndarray]], np.ndarray],
    inputs: list[np.ndarray],
    dy: np.ndarray,
    wrt: Sequence[int],
    *,
    eps: float = 1e-6,
) -> list[np.ndarray]:
    """d(sum(f(inputs) · dy)) / d inputs[i] for i in ``wrt``, by central differences in float64."""
    grads = []
    for i in wrt:
        x = inputs[i]
        g = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            orig = x[idx]
            x[idx] = orig + eps
            up = float(np.sum(f(inputs) * dy))
            x[idx] = orig - eps
            down = float(np.sum(f(inputs) * dy))
            x[idx] = orig
            g[idx] = (up - down) / (2 * eps)
        grads.append(g)
    return grads
