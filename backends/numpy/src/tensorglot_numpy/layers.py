"""NumPy kernels of the layers: see `tensorglot.kernels` (the embedding, the cross-entropy, the cache's
write); the spec composes the transformer from them and the ops' kernels."""

from __future__ import annotations

import numpy as np


def embedding(table, tokens):
    return table[tokens]  # (B, S, D)


def embedding_backward(dx, tokens, vocab):
    dtable = np.zeros((vocab, dx.shape[-1]), dx.dtype)
    np.add.at(dtable, tokens.reshape(-1), dx.reshape(-1, dx.shape[-1]))  # a repeated token adds up
    return dtable


def _log_normaliser(z):
    m = z.max(axis=-1, keepdims=True)
    return m + np.log(np.exp(z - m).sum(axis=-1, keepdims=True))  # (..., 1), max-subtracted


def cross_entropy(logits, targets):
    picked = np.take_along_axis(logits, targets[..., None], axis=-1)
    return np.asarray((_log_normaliser(logits) - picked).mean(), dtype=logits.dtype)


def cross_entropy_backward(logits, dloss, targets):
    dz = np.exp(logits - _log_normaliser(logits))  # softmax
    np.put_along_axis(dz, targets[..., None], np.take_along_axis(dz, targets[..., None], axis=-1) - 1.0, axis=-1)
    return dz * (dloss / targets.size)


def cache_write(storage, slots, rows):
    storage[:, slots] = rows
    return storage
