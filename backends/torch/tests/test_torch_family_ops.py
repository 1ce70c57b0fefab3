"""The ops the model families need (Gemma's RMSNorm and GeGLU, softcapped and sliding-window attention)
against oracles nobody here wrote: Hugging Face's Gemma modules, ``F.gelu(approximate="tanh")`` and
``F.scaled_dot_product_attention`` with an explicit window mask; and each Function's gradcheck."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import tensorglot
from tensorglot_torch import ops

gemma2 = pytest.importorskip("transformers.models.gemma2.modeling_gemma2", reason="needs transformers' Gemma 2")
gemma3 = pytest.importorskip("transformers.models.gemma3.modeling_gemma3", reason="needs transformers' Gemma 3")

F64 = torch.float64
be = tensorglot.get_backend("torch")


def randn(*shape, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64).to(dtype)


def gradcheck(fn, *inputs):
    inputs = [t.detach().requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


# -- Gemma's RMSNorm: (1 + w), multiplied in float32, cast at the end --------------------------------------


@pytest.mark.parametrize("norm", [gemma2.Gemma2RMSNorm, gemma3.Gemma3RMSNorm], ids=["gemma2", "gemma3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_with_offset_one_is_gemmas_rms_norm(norm, dtype):
    x, w = randn(3, 5, 64, dtype=dtype, seed=1) * 3, randn(64, seed=2) * 0.2
    hf = norm(64, eps=1e-6).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(w.to(dtype))
        want = hf(x)
    got = be.ops.rms_norm(x, hf.weight.detach(), eps=1e-6, offset=1.0)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same operations in the same order


def test_rms_norm_gradients_with_offset_equal_autograd_through_gemmas_norm():
    # float32: HF's norm computes in float32 whatever the input (x.float())
    x, dy = randn(2, 3, 16, dtype=torch.float32, seed=3), randn(2, 3, 16, dtype=torch.float32, seed=4)
    hf = gemma2.Gemma2RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        hf.weight.copy_(randn(16, seed=5) * 0.3)
    x.requires_grad_()
    want = torch.autograd.grad(hf(x), (x, hf.weight), dy)
    got = be.ops.rms_norm_backward(x.detach(), hf.weight.detach(), dy, eps=1e-6, offset=1.0)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_rms_norm_offset_gradcheck():
    gradcheck(lambda x, w: ops.RMSNorm.apply(x, w, 1e-6, None, 1.0), randn(2, 3, 5), randn(5, seed=1) * 0.1)


# -- GeGLU ---------------------------------------------------------------------------------------------------


def test_geglu_equals_gemmas_mlp():
    config = SimpleNamespace(hidden_size=8, intermediate_size=24, hidden_activation="gelu_pytorch_tanh")
    hf = gemma2.Gemma2MLP(config).double()
    x, dy = randn(2, 5, 8, seed=6), randn(2, 5, 8, seed=7)
    x.requires_grad_()
    want = hf(x)
    dwant = torch.autograd.grad(want, (x, hf.gate_proj.weight, hf.up_proj.weight, hf.down_proj.weight), dy)
    weights = [m.weight.detach().T for m in (hf.gate_proj, hf.up_proj, hf.down_proj)]  # nn.Linear is (out, in)
    torch.testing.assert_close(be.ops.geglu(x.detach(), *weights), want.detach(), rtol=1e-12, atol=1e-12)
    dx, *dws = be.ops.geglu_backward(x.detach(), *weights, dy)
    torch.testing.assert_close(dx, dwant[0], rtol=1e-12, atol=1e-12)
    for g, e in zip(dws, dwant[1:]):
        torch.testing.assert_close(g, e.T, rtol=1e-12, atol=1e-12)


def test_geglu_gate_is_torchs_tanh_gelu():
    x, wg, wu, wd = randn(4, 6, seed=8), randn(6, 10, seed=9), randn(6, 10, seed=10), randn(10, 6, seed=11)
    want = (F.gelu(x @ wg, approximate="tanh") * (x @ wu)) @ wd
    torch.testing.assert_close(be.ops.geglu(x, wg, wu, wd), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_gated_mlp_gradcheck(activation):
    gradcheck(
        lambda *a: ops.GatedMLP.apply(*a, activation),
        randn(2, 3, 4),
        randn(4, 6, seed=1),
        randn(4, 6, seed=2),
        randn(6, 4, seed=3),
    )


def test_geglu_autograd_equals_its_backward():
    inputs = [randn(2, 3, 4, dtype=torch.float32, seed=s) for s in (0,)] + [
        randn(*s, dtype=torch.float32, seed=n) for n, s in enumerate([(4, 8), (4, 8), (8, 4)], 1)
    ]
    dy = randn(2, 3, 4, dtype=torch.float32, seed=9)
    leaves = [t.requires_grad_() for t in inputs]
    got = torch.autograd.grad(be.ops.geglu(*leaves), leaves, dy)
    want = be.ops.geglu_backward(*(t.detach() for t in inputs), dy)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)
