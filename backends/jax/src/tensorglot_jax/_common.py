"""Helpers shared by the JAX modules: input coercion, static options and the compute dtype."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from tensorglot import checks


def as_array(x: Any) -> jax.Array:
    return x if isinstance(x, jax.Array) else jnp.asarray(x)


def as_float(fn: str, arg: str, x: Any) -> jax.Array:
    x = as_array(x)
    checks.check_float(fn, arg, str(x.dtype))
    return x


def as_int(fn: str, arg: str, x: Any) -> jax.Array:
    x = as_array(x)
    checks.check_int(fn, arg, str(x.dtype))
    return x


def is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def static(fn: str, arg: str, value: Any) -> Any:
    """Options select the computation, so they must be Python values, never traced arrays."""
    if is_traced(value):
        raise TypeError(
            f"{fn}: {arg} is an option and must be a static Python value, got a traced "
            f"{value.aval.str_short()}; close over it or mark it static: "
            f"jax.jit(f, static_argnames=('{arg}',))"
        )
    return value


def compute_dtype(dtype: Any) -> Any:
    """float64 stays float64; everything else is computed in float32."""
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def same_dtype(fn: str, **arrays: jax.Array | None) -> Any:
    present = {k: str(v.dtype) for k, v in arrays.items() if v is not None}
    checks.check_same_dtype(fn, present)
    return next(v.dtype for v in arrays.values() if v is not None)


def flat2d(x: jax.Array) -> jax.Array:
    """(..., n) → (prod(...), n), for weight gradients that sum over every leading axis."""
    return x.reshape(-1, x.shape[-1])
