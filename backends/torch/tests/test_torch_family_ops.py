"""The ops the model families need (Gemma's RMSNorm and GeGLU, softcapped and sliding-window attention)
against oracles nobody here wrote: Hugging Face's Gemma modules, ``F.gelu(approximate="tanh")`` and
``F.scaled_dot_product_attention`` with an explicit window mask; and each Function's gradcheck."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import tensorglot
from tensorglot_torch import flash, ops

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


def test_mlp_gelu_tanh_is_torchs_tanh_gelu_forward_and_backward():
    """GPT-2's and NeoX's MLP activation, against torch's own autograd of F.gelu(approximate="tanh")."""
    x, w_in, w_out, dy = randn(4, 6, seed=12), randn(6, 10, seed=13), randn(10, 6, seed=14), randn(4, 6, seed=15)
    leaves = [t.clone().requires_grad_() for t in (x, w_in, w_out)]
    want = F.gelu(leaves[0] @ leaves[1], approximate="tanh") @ leaves[2]
    torch.testing.assert_close(
        be.ops.mlp(x, w_in, w_out, activation="gelu_tanh"), want.detach(), rtol=1e-12, atol=1e-12
    )
    for g, e in zip(
        be.ops.mlp_backward(x, w_in, w_out, dy, activation="gelu_tanh"), torch.autograd.grad(want, leaves, dy)
    ):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


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


# -- softcapped and sliding-window attention ----------------------------------------------------------------


def window_mask(s, t, w):
    """Mistral's and HF's sliding window, bottom-right: query i (at i + t − s) sees key j iff i − w < j ≤ i."""
    i = torch.arange(s)[:, None] + (t - s)
    j = torch.arange(t)[None, :]
    return (j <= i) & (j > i - w)


def sdpa(q, k, v, mask):
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # (B, N|K, L, H)
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True).transpose(1, 2)


@pytest.fixture(params=[64, 2], ids=["one-block", "blocks-of-2"])
def block(request, monkeypatch):
    monkeypatch.setattr(ops, "_BLOCK", request.param)


@pytest.mark.parametrize("s,t,w", [(7, 7, 3), (3, 9, 4), (1, 9, 4), (6, 6, 1), (5, 5, 9)])
def test_window_equals_sdpa_with_an_explicit_window_mask(s, t, w, block):
    q, k, v = randn(2, s, 4, 8, seed=1), randn(2, t, 2, 8, seed=2), randn(2, t, 2, 8, seed=3)
    dy = randn(2, s, 4, 8, seed=4)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    want = sdpa(*leaves, window_mask(s, t, w))
    dwant = torch.autograd.grad(want, leaves, dy)
    torch.testing.assert_close(be.ops.attention(q, k, v, causal=True, window=w), want.detach())  # s = 1: decode path
    for g, e in zip(be.ops.attention_backward(q, k, v, dy, causal=True, window=w), dwant):
        torch.testing.assert_close(g, e)
    out = be.ops.flash_attention(q, k, v, causal=True, window=w, block_size=3)
    torch.testing.assert_close(out, want.detach())
    for g, e in zip(be.ops.flash_attention_backward(q, k, v, dy, causal=True, window=w, block_size=3), dwant):
        torch.testing.assert_close(g, e)


def hf_eager(q, k, v, mask, softcap, scale):
    """transformers' Gemma 2 eager attention, its additive mask from our bool one."""
    module = SimpleNamespace(num_key_value_groups=q.shape[2] // k.shape[2], training=False, head_dim=q.shape[3])
    additive = torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(~mask, -torch.inf)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    return gemma2.eager_attention_forward(module, qt, kt, vt, additive, scaling=scale, softcap=softcap)[0]


@pytest.mark.parametrize("window", [None, 3])
def test_softcap_equals_gemma2s_eager_attention(window, block):
    # float32: HF's eager softmax runs in float32 whatever the input
    s, t, cap, f32 = 6, 8, 0.9, torch.float32
    q, k, v = (
        randn(2, s, 4, 8, dtype=f32, seed=5) * 2,
        randn(2, t, 2, 8, dtype=f32, seed=6),
        randn(2, t, 2, 8, dtype=f32, seed=7),
    )
    mask = window_mask(s, t, window or t)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    want = hf_eager(*leaves, mask, cap, 0.3)  # (B, S, N, H)
    dy = randn(*want.shape, dtype=f32, seed=8)
    dwant = torch.autograd.grad(want, leaves, dy)
    kw = dict(causal=True, window=window, softcap=cap, scale=0.3)
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(be.ops.attention(q, k, v, **kw), want.detach(), **tol)
    for g, e in zip(be.ops.attention_backward(q, k, v, dy, **kw), dwant):
        torch.testing.assert_close(g, e, **tol)
    for g, e in zip(be.ops.flash_attention_backward(q, k, v, dy, **kw, block_size=4), dwant):
        torch.testing.assert_close(g, e, **tol)


def test_softcap_in_a_decoding_step_equals_the_blocked_path():
    q, k, v = randn(2, 1, 4, 8, seed=9) * 3, randn(2, 9, 2, 8, seed=10), randn(2, 9, 2, 8, seed=11)
    mask = torch.ones(1, 1, 1, 9, dtype=torch.bool)  # a mask sends the step through the blocked path
    for window in (None, 4):
        kw = dict(causal=True, softcap=1.5, window=window)
        torch.testing.assert_close(be.ops.attention(q, k, v, **kw), be.ops.attention(q, k, v, mask=mask, **kw))


@pytest.mark.parametrize(
    "causal,mask,softcap,window", [(True, False, 0.8, 2), (False, True, 1.3, None), (True, True, None, 3)]
)
def test_attention_with_softcap_and_window_gradcheck(causal, mask, softcap, window, block):
    m = torch.rand(2, 1, 4, 5, generator=torch.Generator().manual_seed(2)) > 0.3 if mask else None
    gradcheck(
        lambda q, k, v: ops.Attention.apply(q, k, v, causal, m, 0.7, softcap, window),
        randn(2, 4, 4, 3, seed=1),
        randn(2, 5, 2, 3, seed=2),
        randn(2, 5, 2, 3, seed=3),
    )
    gradcheck(
        lambda q, k, v: flash.FlashAttention.apply(q, k, v, causal, m, 0.7, 2, softcap, window),
        randn(2, 4, 4, 3, seed=1),
        randn(2, 5, 2, 3, seed=2),
        randn(2, 5, 2, 3, seed=3),
    )


@pytest.mark.parametrize("window", [None, 3])
def test_attention_autograd_with_softcap_and_window_equals_backward(window, block):
    inputs = [randn(2, 5, 4, 8, dtype=torch.float32, seed=n) for n in (1,)]
    inputs += [randn(2, 6, 2, 8, dtype=torch.float32, seed=n) for n in (2, 3)]
    dy = randn(2, 5, 4, 8, dtype=torch.float32, seed=4)
    kw = dict(causal=True, softcap=1.1, window=window)
    leaves = [t.requires_grad_() for t in inputs]
    for fwd, bwd in (
        (be.ops.attention, be.ops.attention_backward),
        (be.ops.flash_attention, be.ops.flash_attention_backward),
    ):
        got = torch.autograd.grad(fwd(*leaves, **kw), leaves, dy)
        for g, e in zip(got, bwd(*(t.detach() for t in inputs), dy, **kw)):
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)
