"""JAX kernels of the layers: see `tensorglot.kernels` (the embedding, the cross-entropy, the cache's
write, and how to differentiate). The spec composes the transformer from them and the ops' kernels; the
loss is a `custom_vjp` whose bwd is the explicit kernel, like every op's, and the embedding a gather,
whose transpose JAX already computes as `embedding_backward`'s scatter-add."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from ._common import vjp_kernel


def embedding(table, tokens):
    return table[tokens]  # (B, S, D)


def embedding_backward(dx, tokens, vocab):
    dtable = jnp.zeros((vocab, dx.shape[-1]), dx.dtype)
    return dtable.at[tokens.reshape(-1)].add(dx.reshape(-1, dx.shape[-1]))  # a repeated token adds up


def _lse(logits):
    return jax.nn.logsumexp(logits, axis=-1, keepdims=True)  # (B, S, 1), max-subtracted


def _cross_entropy(logits, targets):
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)
    return (_lse(logits) - picked).mean(), (logits, targets)


def cross_entropy_backward(logits, dloss, targets):
    dz = jnp.exp(logits - _lse(logits))  # softmax
    dz = dz - jax.nn.one_hot(targets, logits.shape[-1], dtype=dz.dtype)
    return dz * (dloss / targets.size)


def _cross_entropy_bwd(res, dloss):
    logits, targets = res
    return cross_entropy_backward(logits, dloss, targets), None  # targets are ints: no gradient


cross_entropy = vjp_kernel(_cross_entropy, _cross_entropy_bwd, ())


@partial(jax.jit, donate_argnums=0)  # the old storage's buffer is reused: a write costs its rows, not a copy
def cache_write(storage, slots, rows):
    return storage.at[:, slots].set(rows)  # a new array (JAX's are immutable); the cache keeps only it


def autograd_value_and_grad(fn, params):
    return jax.value_and_grad(fn)(params)
