"""The modules of tensorglot_torch.nn: the NumPy reference's logits from the same params, the spec's
names both ways, cached decoding, and gradients equal to the functional layers'."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tensorglot
from tensorglot import TransformerConfig, init_params
from tensorglot_torch.nn import MLP, Linear, MultiHeadAttention, RMSNorm, SwiGLU, Transformer

REF = tensorglot.get_backend("numpy")
layers = tensorglot.get_backend("torch").layers
ops = tensorglot.get_backend("torch").ops

CONFIGS = {
    "gqa-swiglu-neox-partial": dict(n_kv_heads=2, activation="swiglu", rope_style="neox", rotary_dim=2),
    "mha-gelu-tied": dict(n_kv_heads=4, activation="gelu", tie_embeddings=True),
    "mqa-relu-yarn": dict(
        n_kv_heads=1,
        activation="relu",
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    ),
}


def config(name="gqa-swiglu-neox-partial"):
    base = dict(vocab_size=19, d_model=8, n_layers=2, n_heads=4, head_dim=4, d_ff=12, max_seq_len=24)
    return TransformerConfig(**(base | CONFIGS[name]))


def toks(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 19, shape)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_equal_the_numpy_reference(name):
    cfg = config(name)
    params = init_params(cfg, 3, dtype="float64")
    model = Transformer.from_params(params, cfg)
    assert model.embed.dtype == torch.float64
    tokens = toks((2, 9))
    got = model(torch.from_numpy(tokens)).detach().numpy()
    np.testing.assert_allclose(got, REF.layers.transformer(tokens, params, cfg), rtol=1e-10, atol=1e-12)


def test_params_round_trip_by_name():
    cfg = config("mha-gelu-tied")
    params = init_params(cfg, 4, dtype="float64")
    back = Transformer.from_params(params, cfg).to_params()
    assert list(back) == list(params)
    for k in params:
        np.testing.assert_array_equal(back[k].numpy(), params[k])


def test_a_new_model_is_initialised_as_init_params():
    cfg = config()
    got = Transformer(cfg, seed=7).to_params()
    for k, v in init_params(cfg, 7, dtype="float32").items():
        np.testing.assert_array_equal(got[k].numpy(), v)


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_cached_decoding_equals_recomputation(kind):
    cfg = config()
    model = Transformer.from_params(init_params(cfg, 5, dtype="float64"), cfg)
    tokens = torch.from_numpy(toks((2, 10), seed=1))
    full = model(tokens)
    cache = layers.kv_cache(cfg, 2, 10, kind=kind, block_size=3, dtype="float64")
    pieces = [model(tokens[:, lo:hi], cache=cache) for lo, hi in ((0, 4), (4, 5), (5, 8), (8, 10))]
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-10, atol=1e-12)
    assert cache.lengths().tolist() == [10, 10]


def test_module_gradients_equal_value_and_grad():
    cfg = config("mqa-relu-yarn")
    params = init_params(cfg, 6, dtype="float64")
    model = Transformer.from_params(params, cfg)
    tokens, targets = torch.from_numpy(toks((2, 7), 1)), torch.from_numpy(toks((2, 7), 2))
    loss = model.loss(tokens, targets)
    loss.backward()
    want_loss, want = layers.value_and_grad(tokens, targets, {k: torch.from_numpy(v) for k, v in params.items()}, cfg)
    torch.testing.assert_close(loss.detach(), want_loss)
    named = model.spec_params()
    for k in params:
        torch.testing.assert_close(named[k].grad, want[k], rtol=1e-10, atol=1e-12)


def test_module_generate_equals_functional_generate():
    cfg = config()
    params = init_params(cfg, 8, dtype="float64")
    prompt = torch.from_numpy(toks((2, 3), 3))
    got = Transformer.from_params(params, cfg).generate(prompt, max_new_tokens=6, cache="paged")
    want = REF.layers.generate(params, cfg, prompt.numpy(), max_new_tokens=6, cache=None)
    np.testing.assert_array_equal(got.numpy(), want)


def test_leaf_modules_compute_their_ops():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    lin = Linear(8, 5, dtype=torch.float64)
    torch.testing.assert_close(lin(x), x @ lin.weight + lin.bias)
    mlp = MLP(8, 16, activation="silu", dtype=torch.float64)
    torch.testing.assert_close(mlp(x), torch.nn.functional.silu(x @ mlp.w_in) @ mlp.w_out)
    sw = SwiGLU(8, 16, dtype=torch.float64)
    torch.testing.assert_close(sw(x), (torch.nn.functional.silu(x @ sw.w_gate) * (x @ sw.w_up)) @ sw.w_down)
    norm = RMSNorm(8, eps=1e-5, dtype=torch.float64)
    torch.testing.assert_close(norm(x), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))


def test_attention_module_equals_the_reference_attention_layer():
    cfg = config()
    params = init_params(cfg, 9, dtype="float64")
    attn = MultiHeadAttention(cfg, layer=1, dtype=torch.float64)
    with torch.no_grad():
        for n in ("wq", "wk", "wv", "wo"):
            getattr(attn, n).copy_(torch.from_numpy(params[f"layers.1.{n}"]))
    x = np.random.default_rng(0).standard_normal((2, 5, 8))
    want = REF.layers.attention_layer(x, params, cfg, layer=1)
    np.testing.assert_allclose(attn(torch.from_numpy(x)).detach().numpy(), want, rtol=1e-10, atol=1e-12)


def test_bad_tokens_name_the_module():
    model = Transformer(config())
    with pytest.raises(ValueError, match=r"transformer: tokens must lie in \[0, vocab_size\)"):
        model(torch.tensor([[1, 19]]))


def test_cache_overflow_is_refused_and_leaves_the_cache_as_it_was():
    cfg = config()
    model = Transformer(cfg)
    cache = layers.kv_cache(cfg, 1, 4)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        with pytest.raises(ValueError, match="max_len = 4"):
            model(torch.tensor([[4, 5]]), cache=cache)
    assert cache.lengths().tolist() == [3]


def test_gqa_attention_equals_mha_with_repeated_kv_heads():
    q = torch.randn(2, 5, 6, 4, dtype=torch.float64)
    k, v = torch.randn(2, 5, 2, 4, dtype=torch.float64), torch.randn(2, 5, 2, 4, dtype=torch.float64)
    rep = ops.attention(q, k.repeat_interleave(3, 2), v.repeat_interleave(3, 2), causal=True)
    torch.testing.assert_close(ops.attention(q, k, v, causal=True), rep)
