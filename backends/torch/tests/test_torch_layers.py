"""The torch kernels behind the spec's layers: a decoding step's attention, the embedding and the loss."""

from __future__ import annotations

import pytest
import torch

import tensorglot
from tensorglot_torch import ops

be = tensorglot.get_backend("torch")


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize(("N", "K", "T"), [(8, 4, 7), (4, 4, 5), (6, 1, 3), (4, 2, 0)])
@pytest.mark.parametrize("causal", [True, False])
def test_a_decoding_step_attends_as_the_function(N, K, T, causal):
    q, k, v = randn(3, 1, N, 4), randn(3, T, K, 4, seed=1), randn(3, T, K, 4, seed=2)
    want = ops._attention_function(q, k, v, causal, None, 0.5)
    torch.testing.assert_close(ops.attention(q, k, v, causal, None, 0.5), want, rtol=1e-12, atol=1e-12)


def test_a_decoding_step_keeps_the_overflow_rule():
    q, k, v = torch.full((1, 1, 2, 1), 1e30), torch.full((1, 3, 1, 1), 1e30), torch.tensor([1.0, 5.0, 3.0])
    k[0, 1] = -1e30  # float32 scores +inf, -inf, +inf: the two +inf keys share the weight
    got = ops.attention(q, k, v.reshape(1, 3, 1, 1), True, None, 1.0)
    torch.testing.assert_close(got.reshape(2), torch.tensor([2.0, 2.0]))


def test_a_step_that_needs_gradients_takes_the_function():
    q = randn(2, 1, 4, 4).requires_grad_()
    k, v = randn(2, 5, 2, 4, seed=1), randn(2, 5, 2, 4, seed=2)
    out = ops.attention(q, k, v, True, None, 0.5)
    assert out.grad_fn is not None and "Attention" in type(out.grad_fn).__name__


def test_embedding_and_loss_follow_their_explicit_backward():
    tokens, targets = torch.tensor([[1, 3, 1], [0, 3, 3]]), torch.tensor([[1, 0, 4], [2, 2, 3]])
    table, logits = randn(5, 4).requires_grad_(), randn(2, 3, 5).requires_grad_()
    k = be.kernels
    (k.embedding(table, tokens) * randn(2, 3, 4, seed=3)).sum().backward()
    torch.testing.assert_close(table.grad, k.embedding_backward(randn(2, 3, 4, seed=3), tokens, 5))
    loss = k.cross_entropy(logits, targets)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits.reshape(6, 5), targets.reshape(6)))
    loss.backward()
    dloss = torch.ones((), dtype=torch.float64)
    torch.testing.assert_close(logits.grad, k.cross_entropy_backward(logits.detach(), dloss, targets))
