"""The flash attention kernel: autograd through the public op equals its explicit backward and the naive
attention's gradients, its Function passes gradcheck in float64, and only the inputs that need a gradient
get one."""

from __future__ import annotations

import pytest
import torch

import tensorglot
from tensorglot_torch import flash

be = tensorglot.get_backend("torch")


def _inputs(B=2, S=5, T=7, N=4, K=2, H=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype) for shape in ((B, S, N, H), (B, T, K, H), (B, T, K, H))]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block_size", [2, 3, 128])
def test_autograd_equals_explicit_backward_and_naive(causal, block_size):
    q, k, v = (t.requires_grad_() for t in _inputs())
    mask = torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(1)) < 0.7
    out = be.ops.flash_attention(q, k, v, causal=causal, mask=mask, block_size=block_size)
    dy = torch.randn_like(out)
    auto = torch.autograd.grad(out, (q, k, v), dy)
    explicit = be.ops.flash_attention_backward(q, k, v, dy, causal=causal, mask=mask, block_size=block_size)
    naive = torch.autograd.grad(be.ops.attention(q, k, v, causal=causal, mask=mask), (q, k, v), dy)
    for a, e, n in zip(auto, explicit, naive):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a, n, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("with_mask", [False, True])
def test_gradcheck_with_queries_that_see_nothing(with_mask):
    q, k, v = (t.requires_grad_() for t in _inputs(S=6, T=4))  # causal, S > T: the first two see nothing
    mask = torch.rand(2, 1, 6, 4, generator=torch.Generator().manual_seed(1)) < 0.7 if with_mask else None

    def f(q, k, v):
        return flash.FlashAttention.apply(q, k, v, True, mask, 0.6, 4)

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_only_requested_gradients_are_returned():
    q, k, v = _inputs(dtype=torch.float32)
    k.requires_grad_()
    out = flash.FlashAttention.apply(q, k, v, True, None, 0.5, 2)
    out.sum().backward()
    assert k.grad is not None and q.grad is None and v.grad is None


def test_bfloat16_is_computed_in_float32_and_cast_back():
    q, k, v = (t.to(torch.bfloat16).requires_grad_() for t in _inputs(dtype=torch.float32))
    out = be.ops.flash_attention(q, k, v, causal=True, block_size=2)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert q.grad.dtype == k.grad.dtype == v.grad.dtype == torch.bfloat16
    want = be.ops.flash_attention(*(t.detach().float() for t in (q, k, v)), causal=True, block_size=2)
    torch.testing.assert_close(out.float(), want.to(torch.bfloat16).float(), rtol=0, atol=0)
