"""Every kernel's autograd.Function passes gradcheck in float64, and autograd through each public op
(``be.ops``, the spec's front end over the kernels) equals the op's explicit ``*_backward`` (the two share
code, so this pins the wiring: argument order, needs, the front end's casts)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tensorglot
from tensorglot.encodings import frequency_table, yarn_attention_factor
from tensorglot_torch import layers, ops
from tensorglot_torch.encodings import Rope

F64 = torch.float64
be = tensorglot.get_backend("torch")


@pytest.fixture(params=[64, 2], ids=["one-block", "blocks-of-2"])
def block(request, monkeypatch):
    """Causal attention runs in blocks of query rows; 2 makes the small cases cross block edges."""
    monkeypatch.setattr(ops, "_BLOCK", request.param)
    return request.param


def randn(*shape, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed + len(shape) * 7 + sum(shape))
    return torch.randn(*shape, generator=g, dtype=F64).to(dtype).requires_grad_()


def gradcheck(fn, *inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


# -- gradcheck, one per Function and option ----------------------------------------------------------


@pytest.mark.parametrize("axis", [-1, 0])
def test_softmax_gradcheck(axis):
    gradcheck(lambda x: ops.Softmax.apply(x, axis % 2), randn(3, 5))


@pytest.mark.parametrize("bias", [True, False])
def test_linear_gradcheck(bias):
    b = randn(4) if bias else None
    gradcheck(
        lambda x, w, *b: ops.Linear.apply(x, w, *b) if b else ops.Linear.apply(x, w, None),
        randn(2, 3, 5),
        randn(5, 4),
        *([b] if bias else []),
    )


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu"])
def test_mlp_gradcheck(activation):
    gradcheck(lambda x, a, b: ops.MLP.apply(x, a, b, activation), randn(2, 3, 4), randn(4, 6), randn(6, 4))


def test_swiglu_gradcheck():
    gradcheck(lambda *a: ops.GatedMLP.apply(*a, "silu"), randn(2, 3, 4), randn(4, 6), randn(4, 6), randn(6, 4))


def test_rms_norm_gradcheck():
    gradcheck(lambda x, w: ops.RMSNorm.apply(x, w, 1e-6, None), randn(2, 3, 5), randn(5))


@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_gradcheck(bias):
    b = [randn(5)] if bias else []
    gradcheck(lambda x, w, *b: ops.LayerNorm.apply(x, w, b[0] if b else None, 1e-5), randn(2, 3, 5), randn(5), *b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_equals_torch_layer_norm(dtype, bias):
    """An oracle nobody here wrote: F.layer_norm, forward and autograd (half computed in float32 inside)."""
    x, w, b = randn(3, 4, 16, dtype=dtype, seed=1), randn(16, dtype=dtype, seed=2), randn(16, dtype=dtype, seed=3)
    dy = randn(3, 4, 16, dtype=dtype, seed=4).detach()
    ours, theirs = (
        be.ops.layer_norm(x, w, b if bias else None),
        torch.nn.functional.layer_norm(x.float(), (16,), w.float(), b.float() if bias else None).to(dtype),
    )
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(ours, theirs, **tol)
    args = (x, w, b) if bias else (x, w)
    want = torch.autograd.grad(theirs, args, dy)
    got = be.ops.layer_norm_backward(x.detach(), w.detach(), dy, bias=bias)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, **tol)


def test_rms_norm_rounds_the_normalised_x_before_the_weight():
    x, w = randn(4, 64, dtype=torch.float32).detach(), randn(64, dtype=torch.float32).detach()
    n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    got = ops.rms_norm(x, w, 1e-6, "float16")
    torch.testing.assert_close(got, n.half().float() * w, rtol=0, atol=0)
    assert not torch.equal(got, ops.rms_norm(x, w, 1e-6, None))


@pytest.mark.parametrize(
    "n,k,causal,with_mask,s,t",
    [(4, 2, True, False, 3, 5), (2, 2, False, True, 4, 4), (3, 1, True, True, 4, 3), (2, 1, True, False, 5, 2)],
)
def test_attention_gradcheck(n, k, causal, with_mask, s, t, block):
    mask = None
    if with_mask:
        mask = torch.rand(2, 1, s, t, generator=torch.Generator().manual_seed(1)) > 0.3
        mask[0, 0, 0] = False  # a query that sees nothing: zeros and no gradient
    scale = 0.7

    def f(q, k_, v):
        return ops.Attention.apply(q, k_, v, causal, mask, scale)

    gradcheck(f, randn(2, s, n, 3), randn(2, t, k, 3, seed=1), randn(2, t, k, 3, seed=2))


@pytest.mark.parametrize("style", ["interleaved", "neox"])
@pytest.mark.parametrize("r", [4, 2])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_rope_gradcheck(style, r, sign):
    scaling = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}
    inv_freq = frequency_table(r, theta=100.0, scaling=scaling).astype(np.float32)
    mscale = yarn_attention_factor(scaling)
    gradcheck(lambda x: Rope.apply(x, torch.tensor([0, 5, 2]), inv_freq, mscale, sign, style, r), randn(2, 3, 2, 4))


# -- autograd through the public op equals its explicit backward --------------------------------------


def autograd(fn, inputs, dy):
    y = fn(*inputs)
    y.backward(dy)
    return [None if t is None else t.grad for t in inputs]


def assert_same(got, want, dtype):
    tol = {F64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            assert g.dtype == w.dtype == dtype
            torch.testing.assert_close(g, w, rtol=tol, atol=tol)


DTYPES = [F64, torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_autograd_equals_backward(dtype):
    x, dy = randn(3, 6, dtype=dtype), randn(3, 6, dtype=dtype, seed=9).detach()
    got = autograd(lambda x: be.ops.softmax(x, axis=0), [x], dy)
    assert_same(got, [be.ops.softmax_backward(be.ops.softmax(x, axis=0).detach(), dy, axis=0)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_autograd_equals_backward(dtype, bias):
    x, w = randn(2, 3, 4, dtype=dtype), randn(4, 5, dtype=dtype)
    b = randn(5, dtype=dtype) if bias else None
    dy = randn(2, 3, 5, dtype=dtype, seed=9).detach()
    got = autograd(lambda x, w: be.ops.linear(x, w, b), [x, w], dy)
    if bias:
        got.append(b.grad)
    want = be.ops.linear_backward(x.detach(), w.detach(), dy, bias=bias)
    assert_same(got, list(want[:3] if bias else want[:2]), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu"])
def test_mlp_autograd_equals_backward(dtype, activation):
    inputs = [randn(2, 3, 4, dtype=dtype), randn(4, 8, dtype=dtype), randn(8, 4, dtype=dtype)]
    dy = randn(2, 3, 4, dtype=dtype, seed=9).detach()
    got = autograd(lambda *a: be.ops.mlp(*a, activation=activation), inputs, dy)
    assert_same(got, be.ops.mlp_backward(*(t.detach() for t in inputs), dy, activation=activation), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_autograd_equals_backward(dtype):
    inputs = [
        randn(2, 3, 4, dtype=dtype),
        randn(4, 8, dtype=dtype),
        randn(4, 8, dtype=dtype, seed=3),
        randn(8, 4, dtype=dtype),
    ]
    dy = randn(2, 3, 4, dtype=dtype, seed=9).detach()
    got = autograd(be.ops.swiglu, inputs, dy)
    assert_same(got, be.ops.swiglu_backward(*(t.detach() for t in inputs), dy), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_autograd_equals_backward(dtype):
    inputs = [randn(2, 3, 8, dtype=dtype), randn(8, dtype=dtype)]
    dy = randn(2, 3, 8, dtype=dtype, seed=9).detach()
    got = autograd(lambda x, w: be.ops.rms_norm(x, w, eps=1e-5), inputs, dy)
    assert_same(got, be.ops.rms_norm_backward(*(t.detach() for t in inputs), dy, eps=1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal,with_mask", [(True, False), (False, True), (True, True)])
def test_attention_autograd_equals_backward(dtype, causal, with_mask, block):
    mask = be.ops.padding_mask(torch.tensor([3, 0]), 5) if with_mask else None  # sequence 1 sees nothing
    inputs = [
        randn(2, 4, 6, 8, dtype=dtype),
        randn(2, 5, 2, 8, dtype=dtype, seed=1),
        randn(2, 5, 2, 8, dtype=dtype, seed=2),
    ]
    dy = randn(2, 4, 6, 8, dtype=dtype, seed=9).detach()
    kw = dict(causal=causal, mask=mask, scale=None)
    got = autograd(lambda *a: be.ops.attention(*a, **kw), inputs, dy)
    assert_same(got, be.ops.attention_backward(*(t.detach() for t in inputs), dy, **kw), dtype)
    if with_mask:
        assert torch.all(inputs[0].grad[1] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("style", ["interleaved", "neox"])
def test_rope_autograd_equals_backward(dtype, style):
    x = randn(2, 3, 2, 8, dtype=dtype)
    dy = randn(2, 3, 2, 8, dtype=dtype, seed=9).detach()
    kw = dict(
        positions=torch.tensor([[1, 2, 3], [7, 0, 4]]),
        theta=500.0,
        style=style,
        rotary_dim=6,
        scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    )
    got = autograd(lambda x: be.encodings.rope(x, **kw), [x], dy)
    assert_same(got, [be.encodings.rope_backward(dy, **kw)], dtype)


# -- inputs that disagree: dtype and device ------------------------------------------------------------


def test_dtype_mismatch_names_the_op_and_both_dtypes():
    with pytest.raises(TypeError, match=r"linear: inputs must share one dtype, got x=float32, w=float64"):
        be.ops.linear(torch.ones(2, 3), torch.ones(3, 4, dtype=F64))


@pytest.mark.parametrize(
    "call",
    [
        lambda x, m: be.ops.linear(x, m),
        lambda x, m: be.ops.rms_norm(torch.ones(2, 4), torch.ones(4, device="meta")),
        lambda x, m: be.ops.attention(
            torch.ones(1, 2, 2, 4), torch.ones(1, 2, 1, 4, device="meta"), torch.ones(1, 2, 1, 4)
        ),
        lambda x, m: be.ops.attention(
            torch.ones(1, 2, 2, 4),
            torch.ones(1, 2, 1, 4),
            torch.ones(1, 2, 1, 4),
            mask=torch.ones(2, 2, dtype=torch.bool, device="meta"),
        ),
    ],
    ids=["linear", "rms_norm", "attention-k", "attention-mask"],
)
def test_device_mismatch_is_a_clear_error(call):
    # the meta device stands in for a second device on a machine with one
    with pytest.raises(TypeError, match=r"inputs must be on one device, got .*cpu.*meta|meta.*cpu"):
        call(torch.ones(2, 3), torch.ones(3, 4, device="meta"))


def test_ops_run_on_the_inputs_device():
    # meta tensors carry no data: any op that makes a CPU tensor inside (a hard-coded device) fails here
    x = torch.ones(2, 3, 4, 8, device="meta")
    assert be.ops.attention(x, x, x, causal=True).device.type == "meta"
    assert be.encodings.rope(x).device.type == "meta"


@pytest.mark.parametrize("s,t", [(5, 5), (7, 3), (3, 7)])
def test_blocked_causal_attention_equals_one_block(s, t, monkeypatch):
    q, k, v = randn(2, s, 4, 8).detach(), randn(2, t, 2, 8, seed=1).detach(), randn(2, t, 2, 8, seed=2).detach()
    dy = randn(2, s, 4, 8, seed=3).detach()
    whole = be.ops.attention(q, k, v, causal=True), *be.ops.attention_backward(q, k, v, dy, causal=True)
    monkeypatch.setattr(ops, "_BLOCK", 2)
    blocked = be.ops.attention(q, k, v, causal=True), *be.ops.attention_backward(q, k, v, dy, causal=True)
    for a, b in zip(blocked, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_embedding_gradcheck():
    tokens = torch.tensor([[1, 3, 1], [0, 3, 3]])  # repeated tokens: their gradients add up
    gradcheck(lambda e: layers.Embedding.apply(e, tokens), randn(5, 4))


def test_cross_entropy_gradcheck():
    targets = torch.tensor([[1, 0, 4], [2, 2, 3]])
    gradcheck(lambda z: layers.CrossEntropy.apply(z, targets), randn(2, 3, 5))


def test_cross_entropy_is_the_mean_negative_log_likelihood():
    z = randn(2, 3, 5).detach()
    targets = torch.tensor([[1, 0, 4], [2, 2, 3]])
    want = torch.nn.functional.cross_entropy(z.reshape(6, 5), targets.reshape(6))
    torch.testing.assert_close(layers.CrossEntropy.apply(z, targets), want)


UNCHANGED = {  # every public op and its backward, on q (B, 4, 2, 3), k, v (B, 3, 1, 3), w (3, 3), g (3,)
    "attention": lambda q, k, v, w, g, dy: (be.ops.attention(q, k, v), be.ops.attention_backward(q, k, v, dy)),
    "flash": lambda q, k, v, w, g, dy: be.ops.flash_attention_backward(q, k, v, dy, causal=True, block_size=2),
    "linear": lambda q, k, v, w, g, dy: (be.ops.linear(q, w, g), be.ops.linear_backward(q, w, dy, bias=True)),
    "mlp": lambda q, k, v, w, g, dy: (be.ops.mlp(q, w, w), be.ops.mlp_backward(q, w, w.T, dy, activation="gelu")),
    "swiglu": lambda q, k, v, w, g, dy: (be.ops.swiglu(q, w, w, w), be.ops.swiglu_backward(q, w, w.T, w, dy)),
    "rms_norm": lambda q, k, v, w, g, dy: (be.ops.rms_norm(q, g), be.ops.rms_norm_backward(q, g, dy)),
    "softmax": lambda q, k, v, w, g, dy: be.ops.softmax_backward(be.ops.softmax(q), dy),
    "rope": lambda q, k, v, w, g, dy: (
        be.encodings.rope(q[..., :2], style="neox"),
        be.encodings.rope_backward(dy[..., :2]),
    ),
}


@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("op", UNCHANGED)
def test_ops_leave_their_inputs_unchanged(B, op):
    # with B = 1 a head-major reshape of q is a view of q: scaling it in place once changed the caller's q;
    # the kernels compute in place wherever a tensor is their own
    inputs = [randn(*shape, seed=i).detach() for i, shape in enumerate([(B, 4, 2, 3), (B, 3, 1, 3), (B, 3, 1, 3)])]
    inputs += [randn(3, 3, seed=3).detach(), randn(3, seed=4).detach(), randn(B, 4, 2, 3, seed=5).detach()]
    before = [t.clone() for t in inputs]
    UNCHANGED[op](*inputs)
    for t, b in zip(inputs, before, strict=True):
        assert torch.equal(t, b)


def test_a_kernel_records_its_function_only_when_a_gradient_is_wanted():
    x, w = randn(2, 3), randn(3, 4)
    y = ops.linear(x, w, None)
    assert type(y.grad_fn).__name__ == "LinearBackward"
    with torch.no_grad():
        z = ops.linear(x, w, None)
    assert z.grad_fn is None and ops.linear(x.detach(), w.detach(), None).grad_fn is None
    torch.testing.assert_close(z, y.detach(), rtol=0, atol=0)


def test_rope_tables_follow_an_in_place_change_of_the_positions():
    x = randn(1, 3, 1, 4).detach()
    positions = torch.tensor([0, 1, 2])
    first = be.encodings.rope(x, positions=positions)
    positions.add_(5)  # the same tensor with other values: its cached tables no longer apply
    got = be.encodings.rope(x, positions=positions)
    torch.testing.assert_close(got, be.encodings.rope(x, positions=torch.tensor([5, 6, 7])), rtol=0, atol=0)
    assert not torch.equal(got, first)


def test_rope_tables_made_in_inference_mode_stay_out_of_autograd():
    x = randn(1, 3, 1, 4)
    with torch.inference_mode():
        be.encodings.rope(x.detach())
    be.encodings.rope(x).sum().backward()  # saving an inference tensor for backward would raise
    assert x.grad is not None


def test_softmax_keeps_its_rules_in_the_branch_free_form_that_compiled_graphs_take(monkeypatch):
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([[1.0, 2.0, 3.0], [-inf, -inf, -inf], [inf, 0.0, inf], [nan, 0.0, 1.0]], dtype=F64)
    want = torch.cat([torch.softmax(x[:1], 1), torch.tensor([[0.0, 0, 0], [0.5, 0, 0.5], [nan, nan, nan]], dtype=F64)])
    torch.testing.assert_close(ops.softmax(x, 1), want, equal_nan=True, rtol=0, atol=0)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(ops.softmax(x, 1), want, equal_nan=True, rtol=0, atol=0)
