"""The NumPy transformer against a textbook one written here from the spec's sentences: einsum
projections, a loop over query heads for GQA, RoPE as complex multiplication, an explicit causal
softmax. The conformance suite compares backends with the reference; this pins the reference itself."""

from __future__ import annotations

import math

import numpy as np
import pytest

import tensorglot
from tensorglot import TransformerConfig, init_params

layers = tensorglot.get_backend("numpy").layers

_erf = np.vectorize(math.erf)


def rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope(x, positions, c):
    """Pairs as complex numbers z, rotated by z · e^{i p θ_j}, θ_j = theta^(−2j/r)."""
    r = c.rotary_dim or c.head_dim
    theta = c.rope_theta ** (-np.arange(0, r, 2) / r)  # (r/2,)
    turn = np.exp(1j * positions[:, None] * theta)[None, :, None, :]  # (1, S, 1, r/2)
    out = x.copy()
    if c.rope_style == "interleaved":
        z = (x[..., 0:r:2] + 1j * x[..., 1:r:2]) * turn
        out[..., 0:r:2], out[..., 1:r:2] = z.real, z.imag
    else:
        z = (x[..., : r // 2] + 1j * x[..., r // 2 : r]) * turn
        out[..., : r // 2], out[..., r // 2 : r] = z.real, z.imag
    return out


def mlp(x, p, c):
    if c.activation == "swiglu":
        g = x @ p["w_gate"]
        return (g / (1 + np.exp(-g)) * (x @ p["w_up"])) @ p["w_down"]
    h = x @ p["w_in"]
    act = {
        "relu": lambda z: np.maximum(z, 0),
        "gelu": lambda z: 0.5 * z * (1 + _erf(z / math.sqrt(2))),
        "silu": lambda z: z / (1 + np.exp(-z)),
    }[c.activation]
    return act(h) @ p["w_out"]


def textbook(tokens, params, c: TransformerConfig):
    S = tokens.shape[1]
    pos = np.arange(S)
    x = params["embed"][tokens]
    future = np.triu(np.ones((S, S), dtype=bool), 1)
    for i in range(c.n_layers):
        p = {k.split(".")[-1]: v for k, v in params.items() if k.startswith(f"layers.{i}.")}
        a = rms_norm(x, p["attn_norm"], c.norm_eps)
        q = rope(np.einsum("bsd,dnh->bsnh", a, p["wq"]), pos, c)
        k = rope(np.einsum("bsd,dkh->bskh", a, p["wk"]), pos, c)
        v = np.einsum("bsd,dkh->bskh", a, p["wv"])
        y = np.zeros_like(q)
        for h in range(c.n_heads):
            kv = h // (c.n_heads // c.n_kv_heads)
            scores = q[:, :, h] @ k[:, :, kv].transpose(0, 2, 1) / math.sqrt(c.head_dim)  # (B, S, S)
            scores[:, future] = -np.inf
            w = np.exp(scores - scores.max(-1, keepdims=True))
            y[:, :, h] = (w / w.sum(-1, keepdims=True)) @ v[:, :, kv]
        x = x + np.einsum("bsnh,nhd->bsd", y, p["wo"])
        x = x + mlp(rms_norm(x, p["mlp_norm"], c.norm_eps), p, c)
    head = params["embed"].T if c.tie_embeddings else params["lm_head"]
    return rms_norm(x, params["norm"], c.norm_eps) @ head


@pytest.mark.parametrize(
    "options",
    [
        dict(n_kv_heads=2, activation="swiglu"),
        dict(n_kv_heads=1, activation="relu", rope_style="neox", rotary_dim=2),
        dict(n_kv_heads=4, activation="gelu", tie_embeddings=True, rope_theta=100.0),
        dict(n_kv_heads=2, activation="silu", rotary_dim=6, d_model=12),
    ],
)
def test_transformer_matches_the_textbook_model(options):
    base = dict(vocab_size=17, d_model=10, n_layers=2, n_heads=4, head_dim=8, d_ff=20, max_seq_len=32)
    c = TransformerConfig(**(base | options))
    params = init_params(c, 0, dtype="float64")
    tokens = np.random.default_rng(0).integers(0, c.vocab_size, (2, 9))
    # RoPE's angles are float32 by the spec; the textbook's are float64.
    np.testing.assert_allclose(layers.transformer(tokens, params, c), textbook(tokens, params, c), rtol=1e-6, atol=1e-6)


def test_float32_params_give_float32_logits_close_to_float64():
    c = TransformerConfig(vocab_size=17, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4, d_ff=32)
    tokens = np.arange(12).reshape(2, 6)
    lo = layers.transformer(tokens, init_params(c, 1, dtype="float32"), c)
    hi = layers.transformer(tokens, init_params(c, 1, dtype="float64"), c)
    assert lo.dtype == np.float32
    np.testing.assert_allclose(lo, hi, rtol=1e-4, atol=1e-5)


def test_one_training_step_lowers_the_loss():
    c = TransformerConfig(vocab_size=11, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4, d_ff=32)
    params = init_params(c, 2, dtype="float64")
    tokens = np.random.default_rng(1).integers(0, 11, (4, 8))
    loss, grads = layers.value_and_grad(tokens[:, :-1], tokens[:, 1:], params, c)
    stepped = {k: v - 0.5 * grads[k] for k, v in params.items()}
    assert layers.value_and_grad(tokens[:, :-1], tokens[:, 1:], stepped, c)[0] < loss - 1e-3


def test_half_precision_cache_must_match_the_params():
    c = TransformerConfig(vocab_size=11, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4, d_ff=8)
    cache = layers.kv_cache(c, 1, 4, dtype="float32")
    with pytest.raises(TypeError, match="the cache stores float32"):
        layers.transformer(np.array([[1, 2]]), init_params(c, 0, dtype="float16"), c, cache=cache)
