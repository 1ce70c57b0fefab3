"""PyTorch kernels of the layers: see `tensorglot.kernels` (the embedding, the cross-entropy, the cache's
write, and how to differentiate). The spec composes the transformer from them and the ops' kernels; the
embedding and the loss are `autograd.Function`s whose backward is the explicit kernel, like every op's."""

from __future__ import annotations

import torch

from ._common import kernel
from .prepack import inference as inference


def embedding_backward(dx, tokens, vocab):
    dtable = dx.new_zeros(vocab, dx.shape[-1])
    dtable.index_add_(0, tokens.reshape(-1), dx.reshape(-1, dx.shape[-1]))  # a repeated token adds up
    return dtable


class Embedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table, tokens):
        ctx.save_for_backward(tokens)
        ctx.vocab = table.shape[0]
        return table[tokens]  # (B, S, D)

    @staticmethod
    def backward(ctx, dx):
        (tokens,) = ctx.saved_tensors
        return embedding_backward(dx, tokens, ctx.vocab), None


embedding = kernel(Embedding)


def cross_entropy_backward(logits, dloss, targets, lse=None):
    lse = torch.logsumexp(logits, -1, keepdim=True) if lse is None else lse  # (B, S, 1)
    dz = torch.exp(logits - lse)  # softmax
    dz.scatter_add_(-1, targets[..., None].long(), torch.full_like(lse, -1.0))  # − onehot(target)
    return dz.mul_(dloss / targets.numel())


class CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets):
        lse = torch.logsumexp(logits, -1, keepdim=True)  # (B, S, 1), max-subtracted
        ctx.save_for_backward(logits, targets, lse)
        return (lse[..., 0] - logits.gather(-1, targets[..., None].long())[..., 0]).mean()

    @staticmethod
    def backward(ctx, dloss):
        logits, targets, lse = ctx.saved_tensors
        return cross_entropy_backward(logits, dloss, targets, lse), None


cross_entropy = kernel(CrossEntropy)


def cache_write(storage, slots, rows):
    # A cache is for inference: it keeps detached rows, so no autograd graph spans decoding steps.
    return storage.index_copy_(1, slots, rows.detach())


def autograd_value_and_grad(fn, params):
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    with torch.enable_grad():
        value = fn(leaves)
        grads = torch.autograd.grad(value, list(leaves.values()))
    return value.detach(), dict(zip(leaves, grads))
