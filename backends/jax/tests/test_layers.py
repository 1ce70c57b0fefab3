"""The JAX layers' own promises: pure functions over a pytree, static-shape caches, one compiled generate."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tensorglot
from tensorglot import TransformerConfig, init_params
from tensorglot_jax import layers as jax_layers

be = tensorglot.get_backend("jax")
ref = tensorglot.get_backend("numpy")
CONFIG = TransformerConfig(
    vocab_size=11, d_model=8, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4, d_ff=12, max_seq_len=16
)


@pytest.fixture(scope="module")
def params():
    return {k: jnp.asarray(v) for k, v in init_params(CONFIG, 0).items()}


def _tokens(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, CONFIG.vocab_size, shape), jnp.int32)


def test_transformer_runs_under_jit_with_traced_tokens(params):
    tok = _tokens((2, 5))
    jitted = jax.jit(lambda t, p: be.layers.transformer(t, p, CONFIG))(tok, params)
    np.testing.assert_allclose(jitted, be.layers.transformer(tok, params, CONFIG), rtol=1e-6, atol=1e-6)
    want = ref.layers.transformer(np.asarray(tok), {k: np.asarray(v) for k, v in params.items()}, CONFIG)
    np.testing.assert_allclose(jitted, want, rtol=1e-4, atol=1e-5)


def test_jax_grad_over_the_param_pytree_equals_value_and_grad(params):
    tok, tgt = _tokens((2, 6), 1), _tokens((2, 6), 2)

    def loss(p):
        logits = be.layers.transformer(tok, p, CONFIG)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tgt[..., None], axis=-1))

    value, grads = jax.value_and_grad(loss)(params)
    got_value, got_grads = be.layers.value_and_grad(tok, tgt, params, CONFIG)
    np.testing.assert_allclose(got_value, value, rtol=1e-5)
    assert list(got_grads) == list(params)  # the params' own order
    for name in params:
        np.testing.assert_allclose(got_grads[name], grads[name], rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_cache_update_returns_static_shapes_and_decoding_compiles_once(params, kind):
    cache = be.layers.kv_cache(CONFIG, 2, 12, kind=kind, block_size=4)
    be.layers.transformer(_tokens((2, 3)), params, CONFIG, cache=cache)
    before = jax_layers._cached_forward._cache_size()
    for step in range(4):  # four single-token steps: one shape, so at most one new program
        be.layers.transformer(_tokens((2, 1), 10 + step), params, CONFIG, cache=cache)
    assert jax_layers._cached_forward._cache_size() - before <= 1
    cache.reserve(1)
    zeros = jnp.zeros((2, 1, CONFIG.n_kv_heads, CONFIG.head_dim))
    k_all, _ = cache.update(0, zeros, zeros)
    assert k_all.shape == (2, 12, CONFIG.n_kv_heads, CONFIG.head_dim)  # T = max_len, not the length


def test_generate_is_one_program_with_a_loop_and_in_place_cache_writes(params):
    prompt = _tokens((2, 3))
    hlo = jax_layers._generate_cached.lower(
        params, prompt, config=CONFIG, new=5, kind="contiguous", block_size=16
    ).as_text()
    assert "stablehlo.while" in hlo
    assert "stablehlo.dynamic_update_slice" in hlo or "stablehlo.scatter" in hlo
    out = be.layers.generate(params, CONFIG, prompt, max_new_tokens=5)
    assert out.shape == (2, 8) and out.dtype == jnp.int32
    for kind in ("paged", None):
        np.testing.assert_array_equal(be.layers.generate(params, CONFIG, prompt, max_new_tokens=5, cache=kind), out)


def test_bfloat16_params_give_bfloat16_logits_close_to_float32(params):
    tok = _tokens((1, 4))
    half = be.layers.transformer(tok, {k: v.astype(jnp.bfloat16) for k, v in params.items()}, CONFIG)
    assert half.dtype == jnp.bfloat16
    full = be.layers.transformer(tok, params, CONFIG)
    np.testing.assert_allclose(half.astype(jnp.float32), full, rtol=0.1, atol=0.1)


def test_a_cache_from_another_backend_is_refused(params):
    with pytest.raises(TypeError, match="transformer: cache must be a jax KV cache"):
        be.layers.transformer(_tokens((1, 2)), params, CONFIG, cache=ref.layers.kv_cache(CONFIG, 1, 4))
