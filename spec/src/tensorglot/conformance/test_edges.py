"""The edge cases the spec defines, held on every backend: empty S or T, a query that sees no key, NaN or
inf in keys and values no query sees, H = 0, NumPy scalars as options, token ids of narrow dtypes, and
calls that fail leaving a KV cache exactly as it was (issue 14)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tensorglot import TransformerConfig, init_params

from ._harness import assert_close

ATTENTION = ["attention", "flash_attention"]


def _attention(backend: Any, name: str) -> tuple[Any, Any]:
    if name.startswith("flash") and "flash" not in backend.capabilities:
        pytest.skip(f"backend {backend.name!r} lacks capability 'flash'")
    ops = backend.ops
    kw = {"block_size": 2} if name.startswith("flash") else {}

    def forward(*a: Any, **k: Any) -> Any:
        return getattr(ops, name)(*a, **kw, **k)

    def backward(*a: Any, **k: Any) -> Any:
        return getattr(ops, f"{name}_backward")(*a, **kw, **k)

    return forward, backward


def _put(backend: Any, *arrays: np.ndarray, dtype: str = "float32") -> list[Any]:
    return [backend.asarray(a, dtype) for a in arrays]


def _np(backend: Any, x: Any) -> np.ndarray:
    return np.asarray(backend.to_numpy(x), dtype=np.float64)


def _qkv(B: int, S: int, T: int, N: int, K: int, H: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) for shape in ((B, S, N, H), (B, T, K, H), (B, T, K, H))]


# -- empty axes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ATTENTION)
@pytest.mark.parametrize("causal", [False, True])
def test_zero_queries_give_an_empty_output_and_zero_kv_gradients(backend, name, causal):
    forward, backward = _attention(backend, name)
    q, k, v = _put(backend, *_qkv(2, 0, 3, 4, 2, 4))
    out = _np(backend, forward(q, k, v, causal=causal))
    assert out.shape == (2, 0, 4, 4)
    dq, dk, dv = (_np(backend, g) for g in backward(q, k, v, q, causal=causal))
    assert dq.shape == (2, 0, 4, 4) and dk.shape == dv.shape == (2, 3, 2, 4)
    assert not dk.any() and not dv.any()


@pytest.mark.parametrize("name", ATTENTION)
@pytest.mark.parametrize("causal", [False, True])
def test_zero_keys_give_zeros_a_query_that_sees_no_key(backend, name, causal):
    forward, backward = _attention(backend, name)
    q, k, v = _put(backend, *_qkv(2, 3, 0, 4, 2, 4))
    out = _np(backend, forward(q, k, v, causal=causal))
    assert out.shape == (2, 3, 4, 4) and not out.any()
    dq, dk, dv = (_np(backend, g) for g in backward(q, k, v, q, causal=causal))
    assert dq.shape == (2, 3, 4, 4) and not dq.any()
    assert dk.shape == dv.shape == (2, 0, 2, 4)


@pytest.mark.parametrize("name", ATTENTION)
def test_zero_head_dim_gives_an_empty_output(backend, name):
    forward, backward = _attention(backend, name)
    q, k, v = _put(backend, *_qkv(1, 2, 3, 2, 1, 0))
    assert _np(backend, forward(q, k, v, causal=True)).shape == (1, 2, 2, 0)
    shapes = [_np(backend, g).shape for g in backward(q, k, v, q, causal=True)]
    assert shapes == [(1, 2, 2, 0), (1, 3, 1, 0), (1, 3, 1, 0)]


# -- what no query sees ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ATTENTION)
def test_a_query_that_sees_no_key_outputs_zeros_and_passes_no_gradient(backend, name):
    forward, backward = _attention(backend, name)
    q, k, v = _qkv(1, 3, 4, 2, 1, 4)
    mask = np.ones((1, 1, 3, 4), bool)
    mask[..., 1, :] = False  # query 1 sees nothing
    arrays = _put(backend, q, k, v)
    m = backend.asarray(mask, "bool")
    out = _np(backend, forward(*arrays, mask=m))
    assert not out[:, 1].any() and out[:, 0].any()
    dq = _np(backend, backward(*arrays, *_put(backend, np.ones_like(q)), mask=m)[0])
    assert not dq[:, 1].any()


@pytest.mark.parametrize("name", ATTENTION)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_in_keys_and_values_no_query_sees_do_not_leak(backend, name, bad):
    # Padding: the last two keys of sequence 0 and the last of sequence 1 are masked for every query.
    # The spec defines their contents as irrelevant, so the output and every gradient equal those of the
    # same call with finite values there (the kernels select with `where`, never multiply by zero).
    forward, backward = _attention(backend, name)
    B, S, T, N, K, H = 2, 3, 5, 4, 2, 4
    q, k, v = _qkv(B, S, T, N, K, H, seed=1)
    lengths = np.array([3, 4])
    mask = (np.arange(T)[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, T)
    dirty_k, dirty_v = k.copy(), v.copy()
    for b, n in enumerate(lengths):
        dirty_k[b, n:] = bad
        dirty_v[b, n:] = bad
    dy = np.random.default_rng(2).standard_normal(q.shape)
    m = backend.asarray(mask, "bool")
    for causal in (False, True):
        clean = _put(backend, q, k, v)
        dirty = _put(backend, q, dirty_k, dirty_v)
        expected = _np(backend, forward(*clean, mask=m, causal=causal))
        actual = _np(backend, forward(*dirty, mask=m, causal=causal))
        assert np.isfinite(actual).all(), f"{bad} in a masked-out key or value reached the output"
        assert_close(actual, expected, "float32", what=f"{name} with {bad} masked out")
        grads = backward(*dirty, *_put(backend, dy), mask=m, causal=causal)
        clean_grads = backward(*clean, *_put(backend, dy), mask=m, causal=causal)
        for what, g, c in zip(("dq", "dk", "dv"), grads, clean_grads):
            g, c = _np(backend, g), _np(backend, c)
            assert np.isfinite(g).all(), f"{bad} in a masked-out key or value reached {what}"
            assert_close(g, c, "float32", what=f"{what} of {name} with {bad} masked out")


# -- options given as NumPy scalars ----------------------------------------------------------------


def test_numpy_scalars_are_the_numbers_they_hold(backend):
    ops, enc = backend.ops, backend.encodings
    q, k, v = _put(backend, *_qkv(1, 3, 3, 2, 1, 4))
    x = _put(backend, np.random.default_rng(3).standard_normal((2, 3, 2, 4)))[0]
    w = _put(backend, np.ones(4))[0]
    pairs = [
        (lambda s: ops.attention(q, k, v, scale=s[0], causal=s[1]), (np.float32(0.5), np.bool_(True)), (0.5, True)),
        (lambda s: ops.softmax(x, axis=s), np.int64(1), 1),
        (lambda s: ops.rms_norm(x, w, eps=s), np.float32(1e-3), float(np.float32(1e-3))),
        (lambda s: ops.layer_norm(x, w, eps=s), np.float64(1e-3), 1e-3),
        (lambda s: enc.rope(x, theta=s[0], rotary_dim=s[1]), (np.float64(100.0), np.int64(2)), (100.0, 2)),
        (lambda s: ops.causal_mask(s, s), np.int32(3), 3),
    ]
    if "flash" in backend.capabilities:
        pairs.append((lambda s: ops.flash_attention(q, k, v, block_size=s), np.int64(2), 2))
    for call, numpy_value, value in pairs:
        np.testing.assert_array_equal(_np(backend, call(numpy_value)), _np(backend, call(value)))


# -- token ids -------------------------------------------------------------------------------------


def _model(vocab: int) -> tuple[TransformerConfig, dict[str, np.ndarray]]:
    config = TransformerConfig(
        vocab_size=vocab, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4, d_ff=16, max_seq_len=16
    )
    params = init_params(config, 0, dtype="float32")
    params["lm_head"][:, vocab - 1] += 1.0  # favour the last id: the one a narrow dtype would wrap
    return config, params


@pytest.mark.requires("layers")
@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_generate_refuses_a_prompt_dtype_that_cannot_hold_the_ids(backend, dtype):
    config, params = _model(300)
    params = {k: backend.asarray(p, "float32") for k, p in params.items()}
    prompt = np.array([[1, 2, 3]], dtype=dtype)  # each backend makes its own array of this dtype
    for cache in ("contiguous", None):
        with pytest.raises(TypeError) as info:
            backend.layers.generate(params, config, prompt, max_new_tokens=2, cache=cache)
        for word in ("generate", "prompt", dtype, "299", "int32"):
            assert word in str(info.value)
    with pytest.raises(TypeError, match=f"transformer: tokens .*{dtype}"):
        backend.layers.transformer(prompt, params, config)


@pytest.mark.requires("layers")
@pytest.mark.parametrize("dtype", ["uint8", "int16"])
def test_a_narrow_dtype_that_holds_the_ids_generates_them_in_it(backend, dtype):
    config, params = _model(200)
    params = {k: backend.asarray(p, "float32") for k, p in params.items()}
    prompt = np.array([[1, 2, 3]], dtype=dtype)
    out = backend.layers.generate(params, config, prompt, max_new_tokens=2)
    wide = backend.layers.generate(params, config, backend.asarray(prompt.astype(np.int64), "int32"), max_new_tokens=2)
    assert backend.dtype_name(out) == dtype
    assert backend.to_numpy(out).tolist() == backend.to_numpy(wide).tolist()
    assert backend.to_numpy(out).max() > 127  # ids that an int8 would have wrapped
    expected = backend.layers.transformer(backend.asarray(prompt.astype(np.int64), "int32"), params, config)
    assert_close(_np(backend, backend.layers.transformer(prompt, params, config)), _np(backend, expected), "float32")


@pytest.mark.requires("layers")
def test_huge_token_ids_are_refused(backend):
    config, params = _model(13)
    params = {k: backend.asarray(p, "float32") for k, p in params.items()}
    with pytest.raises(ValueError, match=r"transformer: tokens must lie in \[0, vocab_size\) = \[0, 13\)"):
        backend.layers.transformer(np.array([[1, 2**31 - 1]], dtype=np.int32), params, config)
    with pytest.raises(TypeError, match="transformer: tokens has dtype object, wanted an integer dtype"):
        backend.layers.transformer([[1, 2**70]], params, config)  # too large for any int dtype
    with pytest.raises(TypeError, match="generate: prompt has dtype float64, wanted an integer dtype"):
        backend.layers.generate(params, config, [[1.0, 2.5]], max_new_tokens=1)  # never truncated


# -- a failed call changes no cache ----------------------------------------------------------------


def _state(cache: Any) -> tuple[Any, ...]:
    paged = cache.kind == "paged"
    tables = [cache.block_table(b) for b in range(cache.batch)] if paged else None
    return cache.lengths().tolist(), tables, cache.free_blocks() if paged else None


@pytest.mark.requires("layers")
@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_a_failing_call_leaves_the_cache_as_it_was(backend, kind):
    config, raw = _model(13)
    params = {k: backend.asarray(p, "float32") for k, p in raw.items()}
    layers = backend.layers
    cache = layers.kv_cache(config, 2, 8, kind=kind, block_size=2, dtype="float32")
    layers.transformer(np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int32), params, config, cache=cache)
    before = _state(cache)
    other = "float64" if "float64" in backend.capabilities else "float16"
    other_params = {k: backend.asarray(p, other) for k, p in raw.items()}
    deeper = TransformerConfig(**(config.to_dict() | {"n_layers": 2}))
    good = np.array([[1], [2]], dtype=np.int32)
    failing = {
        "params of another dtype": lambda: layers.transformer(good, other_params, config, cache=cache),
        "another batch": lambda: layers.transformer(good[:1], params, config, cache=cache),
        "another model": lambda: layers.transformer(good, init_params(deeper, 0), deeper, cache=cache),
        "an id past the vocabulary": lambda: layers.transformer(good + 20, params, config, cache=cache),
        "float ids": lambda: layers.transformer(good.astype(np.float32), params, config, cache=cache),
        "past max_len": lambda: layers.transformer(np.ones((2, 6), np.int32), params, config, cache=cache),
        "positions past max_seq_len": lambda: layers.transformer(
            good, params, config, cache=cache, positions=np.array([99], dtype=np.int32)
        ),
    }
    for what, call in failing.items():
        with pytest.raises((TypeError, ValueError)):
            call()
        assert _state(cache) == before, f"a call with {what} changed the cache"
    layers.transformer(good, params, config, cache=cache)  # and the cache still works
    assert cache.lengths().tolist() == [4, 4]
