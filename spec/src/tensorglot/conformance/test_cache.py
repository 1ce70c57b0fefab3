"""Conformance of the KV caches: the protocol, cached decoding equal to recomputation, keys stored after
RoPE, sequences of different lengths in one batch, paged bookkeeping, and capacity errors that leave the
cache unchanged."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tensorglot import init_params
from tensorglot.cache import KVCache, PagedKVCache
from tensorglot.slot_map import row_groups

from ._harness import assert_close
from .test_layers import MODEL_SCALE, best_dtype, put_params, tiny_config, tokens

pytestmark = pytest.mark.requires("layers")

KINDS = ["contiguous", "paged"]


def make_cache(backend: Any, config: Any, batch: int, max_len: int, dtype: str, kind: str, **kw: Any) -> Any:
    if kind == "paged":
        kw.setdefault("block_size", 3)  # small blocks, so short sequences span several
    return backend.layers.kv_cache(config, batch, max_len, kind=kind, dtype=dtype, **kw)


def snapshot(cache: Any) -> tuple[Any, ...]:
    tables = None
    if cache.kind == "paged":
        tables = ([cache.block_table(b) for b in range(cache.batch)], cache.free_blocks())
    return cache.lengths().tolist(), tables


@pytest.mark.parametrize("kind", KINDS)
def test_cache_follows_the_protocol(backend, kind):
    config = tiny_config()
    cache = make_cache(backend, config, 2, 8, "float32", kind)
    assert isinstance(cache, KVCache)
    assert cache.kind == kind
    assert (cache.batch, cache.max_len, cache.n_layers) == (2, 8, config.n_layers)
    assert (cache.n_kv_heads, cache.head_dim) == (config.n_kv_heads, config.head_dim)
    assert cache.lengths().tolist() == [0, 0]
    if kind == "paged":
        assert isinstance(cache, PagedKVCache)
        assert (cache.block_size, cache.num_blocks, cache.free_blocks()) == (3, 6, 6)  # 2 · ceil(8 / 3)


def test_unknown_cache_kind_raises(backend):
    with pytest.raises(ValueError, match="kind"):
        backend.layers.kv_cache(tiny_config(), 1, 4, kind="ring")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("config_name", ["gqa-swiglu-partial-neox", "mha-gelu-tied"])
def test_cached_decoding_equals_recomputation(harness, backend, kind, config_name):
    config = tiny_config(config_name)
    dtype = best_dtype(backend)
    params = put_params(harness, init_params(config, 1, dtype="float64"), dtype)
    tok = tokens((2, 9), seed=1)
    full = harness.get(backend.layers.transformer(harness.put(tok, dtype), params, config))
    cache = make_cache(backend, config, 2, 12, dtype, kind)
    pieces = []
    for lo, hi in ((0, 5), (5, 6), (6, 7), (7, 9)):  # a prefill, two single steps, a two-token chunk
        pieces.append(
            harness.get(backend.layers.transformer(harness.put(tok[:, lo:hi], dtype), params, config, cache=cache))
        )
        assert cache.lengths().tolist() == [hi, hi]
    # The cached pass sums attention over the same keys in a different grouping: rounding only.
    assert_close(np.concatenate(pieces, axis=1), full, dtype, scale=MODEL_SCALE[dtype], what="cached logits")


@pytest.mark.parametrize("kind", KINDS)
def test_keys_are_stored_after_rope(harness, backend, kind):
    config = tiny_config()
    dtype = best_dtype(backend)
    params = init_params(config, 2, dtype="float64")
    tok = tokens((2, 4), seed=2)
    cache = make_cache(backend, config, 2, 8, dtype, kind)
    backend.layers.transformer(harness.put(tok, dtype), put_params(harness, params, dtype), config, cache=cache)
    cache.reserve(1)
    zeros = backend.asarray(np.zeros((2, 1, config.n_kv_heads, config.head_dim)), dtype)
    k_all, v_all = cache.update(0, zeros, zeros)
    k_all, v_all = harness.get(k_all), harness.get(v_all)
    assert k_all.shape[1] >= 5
    ref = harness.reference
    rp = {k: harness.rounded(v, dtype) for k, v in params.items()}
    x = ref.ops.rms_norm(rp["embed"][tok], rp["layers.0.attn_norm"], eps=config.norm_eps)  # (B, S, D)
    k = np.einsum("bsd,dkh->bskh", x, rp["layers.0.wk"])
    v = np.einsum("bsd,dkh->bskh", x, rp["layers.0.wv"])
    k = ref.encodings.rope(k, theta=config.rope_theta, style=config.rope_style, rotary_dim=config.rotary_dim)
    assert_close(k_all[:, :4], k, dtype, scale=MODEL_SCALE[dtype], what="stored keys (after RoPE)")
    assert_close(v_all[:, :4], v, dtype, scale=MODEL_SCALE[dtype], what="stored values (no RoPE)")
    np.testing.assert_array_equal(k_all[:, 4], 0.0)  # the reserved slot holds what update wrote


@pytest.mark.parametrize("kind", KINDS)
def test_sequences_of_different_lengths_in_one_batch(harness, backend, kind):
    """Row 0 ends and starts a new sequence while row 1 goes on: each row equals its own recomputation."""
    config = tiny_config()
    dtype = best_dtype(backend)
    params = put_params(harness, init_params(config, 3, dtype="float64"), dtype)
    first, second = tokens((2, 6), seed=3), tokens((1, 4), seed=4)
    cache = make_cache(backend, config, 2, 12, dtype, kind)
    backend.layers.transformer(harness.put(first[:, :4], dtype), params, config, cache=cache)
    cache.free(0)
    assert cache.lengths().tolist() == [0, 4]
    row0, row1 = [], []
    for i in range(2):  # row 0 reads the new sequence at positions 0, 1; row 1 goes on at 4, 5
        step = np.array([[second[0, i]], [first[1, 4 + i]]], dtype=np.int32)
        out = harness.get(backend.layers.transformer(harness.put(step, dtype), params, config, cache=cache))
        row0.append(out[0, 0])
        row1.append(out[1, 0])
    assert cache.lengths().tolist() == [2, 6]
    want0 = harness.get(backend.layers.transformer(harness.put(second[:, :2], dtype), params, config))[0]
    want1 = harness.get(backend.layers.transformer(harness.put(first[1:], dtype), params, config))[0, 4:6]
    assert_close(np.stack(row0), want0, dtype, scale=MODEL_SCALE[dtype], what="the restarted row")
    assert_close(np.stack(row1), want1, dtype, scale=MODEL_SCALE[dtype], what="the continuing row")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("config_name", ["gqa-swiglu-partial-neox", "post-qknorm-projection-window"])
def test_a_long_row_beside_short_ones_equals_recomputation(harness, backend, kind, config_name):
    """One 320-token row beside seven new short ones: a step reads the rows in two length groups
    (`row_groups`), and every row still equals its own recomputation without a cache."""
    config = tiny_config(config_name, max_seq_len=330)
    dtype = best_dtype(backend)
    params = put_params(harness, init_params(config, 5, dtype="float64"), dtype)
    long, short = tokens((8, 323), seed=5), tokens((8, 3), seed=6)
    cache = make_cache(backend, config, 8, 330, dtype, kind, **({"block_size": 16} if kind == "paged" else {}))
    backend.layers.transformer(harness.put(long[:, :320], dtype), params, config, cache=cache)
    for b in range(1, 8):
        cache.free(b)
    rows = []
    for i in range(3):  # row 0 goes on at 320, 321, 322; rows 1..7 read new sequences at 0, 1, 2
        assert len(row_groups(cache.lengths(), 1)) == 2, "the step would not be read in groups"
        step = np.concatenate([long[:1, 320 + i], short[1:, i]])[:, None].astype(np.int32)
        rows.append(harness.get(backend.layers.transformer(harness.put(step, dtype), params, config, cache=cache)))
    got = np.concatenate(rows, axis=1)  # (8, 3, V)
    assert cache.lengths().tolist() == [323] + [3] * 7
    want0 = harness.get(backend.layers.transformer(harness.put(long[:1], dtype), params, config))[0, 320:]
    want = harness.get(backend.layers.transformer(harness.put(short[1:], dtype), params, config))
    scale = MODEL_SCALE[dtype]
    assert_close(got[0], want0, dtype, scale=scale, what="the long row")
    assert_close(got[1:], want, dtype, scale=scale, what="the short rows")


def test_paged_bookkeeping_leaks_no_block(harness, backend):
    config = tiny_config()
    dtype = best_dtype(backend)
    params = put_params(harness, init_params(config, 4, dtype="float64"), dtype)
    cache = make_cache(backend, config, 3, 9, dtype, "paged", block_size=2)
    assert cache.num_blocks == 15  # 3 · ceil(9 / 2)

    def check_tables() -> None:
        tables = [cache.block_table(b) for b in range(3)]
        for length, table in zip(cache.lengths(), tables):
            assert len(table) == -(-int(length) // 2), (length, table)  # ceil(length / block_size)
        held = [b for t in tables for b in t]
        assert len(held) == len(set(held)), f"a block is held twice: {tables}"
        assert len(held) + cache.free_blocks() == cache.num_blocks

    backend.layers.transformer(harness.put(tokens((3, 3)), dtype), params, config, cache=cache)
    check_tables()
    for _ in range(2):
        backend.layers.transformer(harness.put(tokens((3, 1)), dtype), params, config, cache=cache)
        check_tables()
    returned = cache.block_table(1)
    cache.free(1)
    check_tables()
    assert cache.block_table(1) == []
    backend.layers.transformer(harness.put(tokens((3, 1)), dtype), params, config, cache=cache)
    check_tables()
    assert set(cache.block_table(1)) <= set(returned), "a freed block should be handed out again"
    for b in range(3):
        cache.free(b)
    assert cache.free_blocks() == cache.num_blocks, "blocks leaked after the batch finished"
    assert cache.lengths().tolist() == [0, 0, 0]


def test_paged_generate_returns_every_block(harness, backend):
    config = tiny_config()
    dtype = best_dtype(backend)
    params = put_params(harness, init_params(config, 5, dtype="float64"), dtype)
    cache = make_cache(backend, config, 2, 10, dtype, "paged", block_size=4)
    prompt = harness.put(tokens((2, 5)), dtype)
    logits = backend.layers.transformer(prompt, params, config, cache=cache)
    assert harness.get(logits).shape == (2, 5, config.vocab_size)
    assert cache.free_blocks() == cache.num_blocks - 4
    cache.reset()
    assert cache.free_blocks() == cache.num_blocks
    assert cache.lengths().tolist() == [0, 0]


@pytest.mark.parametrize("kind", KINDS)
def test_writing_past_max_len_raises_and_leaves_the_cache_unchanged(harness, backend, kind):
    config = tiny_config()
    dtype = best_dtype(backend)
    params = put_params(harness, init_params(config, 6, dtype="float64"), dtype)
    tok = tokens((2, 6), seed=5)
    cache = make_cache(backend, config, 2, 5, dtype, kind)
    backend.layers.transformer(harness.put(tok[:, :4], dtype), params, config, cache=cache)
    before = snapshot(cache)
    with pytest.raises(ValueError, match="max_len"):
        backend.layers.transformer(harness.put(tok[:, 4:6], dtype), params, config, cache=cache)
    assert snapshot(cache) == before
    # ... and what it holds is intact: the next token still equals recomputation.
    step = harness.get(backend.layers.transformer(harness.put(tok[:, 4:5], dtype), params, config, cache=cache))
    full = harness.get(backend.layers.transformer(harness.put(tok[:, :5], dtype), params, config))
    assert_close(step[:, 0], full[:, 4], dtype, scale=MODEL_SCALE[dtype], what="logits after the refused write")


def test_running_out_of_blocks_raises_and_leaves_the_cache_unchanged(harness, backend):
    config = tiny_config()
    dtype = best_dtype(backend)
    params = put_params(harness, init_params(config, 7, dtype="float64"), dtype)
    cache = make_cache(backend, config, 2, 8, dtype, "paged", block_size=2, num_blocks=3)
    backend.layers.transformer(harness.put(tokens((2, 2)), dtype), params, config, cache=cache)
    assert cache.free_blocks() == 1
    before = snapshot(cache)
    with pytest.raises(ValueError, match="blocks"):  # each sequence needs a new block; one is free
        backend.layers.transformer(harness.put(tokens((2, 1)), dtype), params, config, cache=cache)
    assert snapshot(cache) == before
    cache.free(0)
    backend.layers.transformer(harness.put(tokens((2, 1)), dtype), params, config, cache=cache)
    assert cache.lengths().tolist() == [1, 3]


def test_cache_of_another_batch_size_raises(harness, backend):
    config = tiny_config()
    params = put_params(harness, init_params(config, 0, dtype="float64"), "float32")
    cache = backend.layers.kv_cache(config, 3, 4, dtype="float32")
    with pytest.raises(ValueError, match="batch"):
        backend.layers.transformer(harness.put(tokens((2, 1)), "float32"), params, config, cache=cache)


def test_a_cache_of_another_dtype_raises_before_taking_a_block(harness, backend):
    other = next((d for d in ("float64", "float16", "bfloat16") if d in backend.capabilities), None)
    if other is None:
        pytest.skip(f"backend {backend.name!r} lacks capability 'float64', 'float16' and 'bfloat16'")
    config = tiny_config()
    params = put_params(harness, init_params(config, 0, dtype="float64"), other)
    cache = make_cache(backend, config, 2, 6, "float32", "paged")
    with pytest.raises(TypeError, match=f"the params have dtype {other}; the cache stores float32"):
        backend.layers.transformer(harness.put(tokens((2, 2)), other), params, config, cache=cache)
    assert snapshot(cache) == ([0, 0], ([[], []], cache.num_blocks))


def test_cache_longer_than_max_seq_len_raises(backend):
    with pytest.raises(ValueError, match="max_seq_len"):
        backend.layers.kv_cache(tiny_config(), 1, 17)
