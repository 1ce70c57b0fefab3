"""The kernels' ``inference`` scope: a `generate` call's products over oneDNN-packed copies of its weights.

Oracles: torch's own ``x @ w`` in float64, and the tokens of the same call with packing turned off."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import tensorglot
from tensorglot.params import TransformerConfig, init_params
from tensorglot_torch import ops, prepack

be = tensorglot.get_backend("torch")
pytestmark = pytest.mark.skipif(not prepack._ONEDNN, reason="this torch has no oneDNN to pack weights for")


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_a_parameter_is_packed_once_and_the_product_matches_torch():
    w, x = randn(64, 96), randn(8, 1, 64, seed=1)
    want = (x.double() @ w.double()).float()
    with prepack.inference({"w": w}):
        got = [prepack.matmul(x, w), prepack.matmul(x, w)]
        packs = dict(prepack._SCOPE.get()["packs"])
    assert len(packs) == 1 and got[0].shape == (8, 1, 96)
    for g in got:
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-5)
    assert prepack._SCOPE.get() is None  # the copies go with the scope


def test_views_of_a_parameter_are_packed_and_read_as_laid_out():
    wq = randn(32, 4, 8)  # (D, heads, H), multiplied as (D, heads·H); a tied head reads embed.T, a strided view
    embed, x = randn(50, 32, seed=2), randn(3, 32, seed=1)
    with prepack.inference({"wq": wq, "embed": embed}):
        for w in (wq.reshape(32, 32), embed.T):
            torch.testing.assert_close(prepack.matmul(x, w), (x.double() @ w.double()).float(), rtol=1e-5, atol=1e-5)
        assert len(prepack._SCOPE.get()["packs"]) == 2


def test_a_single_row_a_temporary_and_float64_take_the_plain_product():
    w = randn(64, 96)
    temporary = w * 2  # not a parameter: its address may later hold other values
    with prepack.inference({"w": w, "w64": w.double()}):
        for x, v in [(randn(1, 64), w), (randn(8, 64), temporary), (randn(8, 64).double(), w.double())]:
            assert torch.equal(prepack.matmul(x, v), x @ v)
        assert prepack._SCOPE.get()["packs"] == {}


@pytest.mark.parametrize(("mb", "packed"), [("0", None), ("0.03", 1), ("1", 2)])
def test_the_budget_caps_the_packed_bytes(monkeypatch, mb, packed):
    monkeypatch.setenv("TENSORGLOT_TORCH_PACK_MB", mb)  # each weight is 24 KiB, 0.0234 MiB
    a, b, x = randn(64, 96), randn(64, 96, seed=3), randn(8, 64)
    with prepack.inference({"a": a, "b": b}):
        for w in (a, b):
            torch.testing.assert_close(prepack.matmul(x, w), x @ w, rtol=1e-5, atol=1e-5)
        scope = prepack._SCOPE.get()
        assert (scope if scope is None else len(scope["packs"])) == packed


@pytest.mark.parametrize("mb", ["lots", "-1", "1e3", "nan", "inf", ""])
def test_a_budget_that_is_not_a_plain_number_of_mib_is_refused(monkeypatch, mb):
    monkeypatch.setenv("TENSORGLOT_TORCH_PACK_MB", mb)
    with pytest.raises(ValueError, match=f"TENSORGLOT_TORCH_PACK_MB must be .* got '{mb}'"):
        prepack.inference({"w": randn(4, 4)}).__enter__()
    assert prepack._SCOPE.get() is None


def test_gradients_through_packed_forwards_equal_those_outside():
    w_gate, w_up, w_down = randn(16, 24), randn(16, 24, seed=1), randn(24, 16, seed=2)
    x = randn(8, 16, seed=3)
    grads = []
    for scope in (contextlib.nullcontext(), prepack.inference({"g": w_gate, "u": w_up, "d": w_down})):
        leaves = [t.clone().requires_grad_() for t in (x, w_gate, w_up, w_down)]
        with scope:
            ops.gated_mlp(*leaves, "silu").square().sum().backward()
        grads.append([t.grad for t in leaves])
    for g, want in zip(*grads):
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-5)


def test_generate_packs_its_weights_and_gives_the_tokens_of_the_plain_products(monkeypatch):
    config = TransformerConfig(vocab_size=64, max_seq_len=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                               head_dim=8, d_ff=64, activation="swiglu")  # fmt: skip
    params = {k: be.asarray(v, "float32") for k, v in init_params(config, 0).items()}
    prompt = be.asarray(np.random.default_rng(1).integers(0, 64, (3, 5)), "int64")
    seen = []

    @contextlib.contextmanager
    def spy(p):
        with prepack.inference(p):
            yield
            scope = prepack._SCOPE.get()
            seen.append(scope and len(scope["packs"]))

    monkeypatch.setattr(be.kernels, "inference", spy)
    runs = {
        cache: be.layers.generate(params, config, prompt, max_new_tokens=6, cache=cache)
        for cache in ("contiguous", None)
    }
    monkeypatch.setenv("TENSORGLOT_TORCH_PACK_MB", "0")
    plain = be.layers.generate(params, config, prompt, max_new_tokens=6, cache="contiguous")
    assert seen == [2 * 7 + 1, 2 * 7 + 1, None]  # per layer q, k, v, o, gate, up, down; and the head; then none
    assert torch.equal(runs["contiguous"], plain) and torch.equal(runs[None], plain)
