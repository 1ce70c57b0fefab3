"""Helpers shared by the JAX modules: the custom_vjp kernel wrapper and the lazy front ends."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax


def vjp_kernel(fwd: Callable[..., Any], bwd: Callable[..., Any], options: tuple[int, ...]) -> Callable[..., Any]:
    """A jitted `jax.custom_vjp` from ``fwd(*args) -> (y, residuals)`` and ``bwd(*options, residuals, dy)``.

    The arguments at ``options`` are static (nondiff) Python values; jitting makes an eager call one XLA
    program, and under an outer jit it inlines."""
    f = jax.custom_vjp(lambda *args: fwd(*args)[0], nondiff_argnums=options)
    f.defvjp(fwd, bwd)
    return jax.jit(f, static_argnums=options)


def flat2d(x: jax.Array) -> jax.Array:
    """(..., n) → (prod(...), n), for weight gradients that sum over every leading axis."""
    return x.reshape(-1, x.shape[-1])


def is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)
