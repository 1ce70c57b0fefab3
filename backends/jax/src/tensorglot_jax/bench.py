"""JAX's part of ``tensorglot bench``: ``jax.nn`` baselines, ``jax.jit`` and XLA's memory analysis."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import tensorglot


def _vjp(f: Callable[..., Any]) -> Callable[..., Callable[[], Any]]:
    """A baseline from ``f``: one jitted program of its forward and its VJP of the row's last argument, dy."""

    @jax.jit
    def step(dy: Any, *xs: Any) -> Any:
        y, pullback = jax.vjp(f, *xs)
        return y, pullback(dy)

    return lambda *args: functools.partial(step, args[-1], *args[:-1])


def _attention(q: Any, k: Any, v: Any) -> Any:
    S, T = q.shape[1], k.shape[1]
    mask = jnp.tril(jnp.ones((S, T), bool), T - S)  # bottom-right, as ours
    return jax.nn.dot_product_attention(q, k, v, mask=mask[None, None])


def temp_bytes(fn: Callable[..., Any], *args: Any) -> int:
    """Bytes of temporaries XLA allocates for the compiled ``fn`` (arguments and outputs not counted)."""
    return int(jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes)  # type: ignore[union-attr]


def baselines() -> dict[str, Any]:
    loss = tensorglot.get_backend("jax").layers.loss
    # jax.grad of our forward and loss, the whole step one program: what a JAX user would write
    step = jax.jit(lambda t, y, p, c: jax.value_and_grad(lambda q: loss(t, y, q, c))(p), static_argnums=3)
    return {
        "ops.softmax.fwd_bwd": ("jax.nn.softmax", _vjp(jax.nn.softmax)),
        "ops.mlp.fwd_bwd": ("jnp relu(x @ w_in) @ w_out", _vjp(lambda x, a, b: jax.nn.relu(x @ a) @ b)),
        "ops.attention.fwd_bwd": ("jax.nn.dot_product_attention", _vjp(_attention)),
        "train.value_and_grad": ("jax.jit", lambda *args: functools.partial(step, *args)),
        "sync": jax.block_until_ready,
        "jit": jax.jit,
        "peak_memory": temp_bytes,
    }
