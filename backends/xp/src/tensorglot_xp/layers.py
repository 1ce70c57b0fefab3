"""Array API kernels of the layers (see `tensorglot.kernels`): the embedding, the cross-entropy, the cache's write.

The standard has gathers (``take``) but no scatter (no ``add.at``, no write at int positions): `embedding_backward`'s
scatter-add is a one-hot product, and `cache_write` writes through a boolean mask (in place where it can).
"""

from __future__ import annotations

import math

from array_api_compat import is_writeable_array

from tensorglot.kernels import device, namespace


def _one_hot(indices, n, dtype):
    """(m,) ints → (m, n), 1 at each index."""
    xp = namespace(indices)
    return xp.astype(indices[:, None] == xp.arange(n, device=device(indices))[None, :], dtype)


def embedding(table, tokens):
    xp = namespace(table)
    rows = xp.take(table, xp.reshape(tokens, (-1,)), axis=0)  # the standard's take wants 1-D indices
    return xp.reshape(rows, (*tokens.shape, table.shape[1]))  # (B, S, D)


def embedding_backward(dx, tokens, vocab):
    xp = namespace(dx)
    # A token read at several positions sums their rows: onehotᵀ · dx adds exactly those (each term is
    # 1·row or 0·row), at the price of a (B·S, V) matrix the scatter-add would not need.
    onehot = _one_hot(xp.reshape(tokens, (-1,)), vocab, dx.dtype)  # (B·S, V)
    return xp.matmul(xp.matrix_transpose(onehot), xp.reshape(dx, (-1, dx.shape[-1])))  # (V, D)


def _log_normaliser(z):
    xp = namespace(z)
    top = xp.max(z, axis=-1, keepdims=True)
    return top + xp.log(xp.sum(xp.exp(z - top), axis=-1, keepdims=True))  # (..., 1), max-subtracted


def cross_entropy(logits, targets):
    xp = namespace(logits)
    picked = xp.take_along_axis(logits, targets[..., None], axis=-1)  # (B, S, 1)
    return xp.mean(_log_normaliser(logits) - picked)


def cross_entropy_backward(logits, dloss, targets):
    xp = namespace(logits)
    onehot = xp.reshape(_one_hot(xp.reshape(targets, (-1,)), logits.shape[-1], logits.dtype), logits.shape)  # (B, S, V)
    return (xp.exp(logits - _log_normaliser(logits)) - onehot) * (dloss / math.prod(targets.shape))


_LAST: list = [(None, None)]  # the last write's slots and plan: a step writes every layer's k and v at the same slots


def cache_write(storage, slots, rows):
    (K, S, H), n, xp, at, (last, plan) = storage.shape, slots.shape[0], namespace(storage), device(storage), _LAST[0]
    if last is not slots or plan[0].shape[0] != K * S:  # so made once a step, not twice a layer
        hit = xp.expand_dims(slots, axis=0) == xp.expand_dims(xp.arange(S, device=at), axis=1)  # (S, n)
        # Slot s takes row first[s], the first i with slots[i] = s (a serving pool's idle rows share a scratch slot)
        written, first = xp.any(hit, axis=1), xp.argmax(xp.astype(hit, xp.int32), axis=1)  # (S,) each
        source = xp.reshape(xp.expand_dims(xp.arange(K, device=at) * n, axis=1) + first, (-1,))  # k·n + first[s]
        written = xp.reshape(xp.broadcast_to(written, (K, S)), (-1,))  # over K·S flat rows: a mask is a sole index
        plan = written, source, source[written] if is_writeable_array(storage) else None
        _LAST[0] = slots, plan
    (written, source, taken), out, rows = plan, xp.reshape(storage, (K * S, H)), xp.reshape(rows, (K * n, H))
    if taken is None:  # a read-only array (JAX's): a gather of every slot
        out = xp.take(xp.concat((out, rows)), xp.where(written, K * S + source, xp.arange(K * S, device=at)), axis=0)
    else:  # the standard's masked write, in place
        out[written] = xp.take(rows, taken, axis=0)
    return xp.reshape(out, (K, S, H))
