"""The JAX layers' own promises: the spec's layers under jit with traced inputs, a cached step and
`generate` compiled once, and caches of the spec's one class."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tensorglot
from tensorglot import TransformerConfig, init_params
from tensorglot.cache import KVCache
from tensorglot_jax import generate as jax_generate

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


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_a_cached_step_compiles_once_and_the_cache_is_the_spec_class(params, kind):
    cache = be.layers.kv_cache(CONFIG, 2, 12, kind=kind, block_size=4)
    assert isinstance(cache, KVCache)
    be.layers.transformer(_tokens((2, 3)), params, CONFIG, cache=cache)
    before = jax_generate._cached._cache_size()
    for step in range(4):  # four single-token steps: one shape, so at most one new program
        be.layers.transformer(_tokens((2, 1), 10 + step), params, CONFIG, cache=cache)
    assert jax_generate._cached._cache_size() - before <= 1
    assert cache.lengths().tolist() == [7, 7]


def test_generate_is_one_program_with_a_loop_and_cache_writes(params):
    prompt = _tokens((2, 3))
    hlo = jax_generate._generate.lower(be.layers, params, prompt, config=CONFIG, new=5, kind="paged").as_text()
    assert "stablehlo.while" in hlo
    assert "stablehlo.scatter" in hlo or "stablehlo.dynamic_update_slice" in hlo
    out = be.layers.generate(params, CONFIG, prompt, max_new_tokens=5)
    assert out.shape == (2, 8) and out.dtype == jnp.int32


def test_bfloat16_params_give_bfloat16_logits_close_to_float32(params):
    tok = _tokens((1, 4))
    half = be.layers.transformer(tok, {k: v.astype(jnp.bfloat16) for k, v in params.items()}, CONFIG)
    assert half.dtype == jnp.bfloat16
    full = be.layers.transformer(tok, params, CONFIG)
    np.testing.assert_allclose(half.astype(jnp.float32), full, rtol=0.1, atol=0.1)


def test_a_cache_made_by_another_backend_is_refused(params):
    with pytest.raises(TypeError, match="the cache was made by the numpy backend; this is jax"):
        be.layers.transformer(_tokens((1, 2)), params, CONFIG, cache=ref.layers.kv_cache(CONFIG, 1, 4))
