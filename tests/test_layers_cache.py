"""The spec's KV cache on NumPy: the bookkeeping (`SlotMap`, `PagedSlotMap`, `visible_mask`) and `KVCache`."""

from __future__ import annotations

import numpy as np
import pytest

import tensorglot
from tensorglot import TransformerConfig, init_params
from tensorglot.cache import KVCache, PagedSlotMap, SlotMap, visible_mask

layers = tensorglot.get_backend("numpy").layers


def test_contiguous_slots_are_row_major():
    m = SlotMap(2, 5)
    m.reserve(3)
    np.testing.assert_array_equal(m.slots(), [[0, 1, 2], [5, 6, 7]])
    m.advance(3)
    m.free(0)
    m.reserve(1)
    np.testing.assert_array_equal(m.slots(), [[0], [8]])
    assert m.visible() == 4


def test_paged_tables_hand_out_the_lowest_free_block_first():
    m = PagedSlotMap(2, 8, 2, 6)
    m.reserve(3)  # two blocks per sequence
    assert m.tables == [[0, 1], [2, 3]]
    np.testing.assert_array_equal(m.slots(), [[0, 1, 2], [4, 5, 6]])
    m.advance(3)
    m.free(0)
    assert m.free_blocks() == 4
    m.reserve(1)  # sequence 0 restarts in block 0; sequence 1 needs no new block (slot 7 of block 3)
    assert m.tables == [[0], [2, 3]]
    np.testing.assert_array_equal(m.slots(), [[0], [7]])
    m.advance(1)
    m.reserve(1)  # sequence 1 crosses into a new block: the lowest free one, 1
    assert m.tables == [[0], [2, 3, 1]]
    np.testing.assert_array_equal(m.gather(5)[1], [4, 5, 6, 7, 2])


def test_refused_reserve_changes_nothing():
    m = PagedSlotMap(2, 4, 2, 3)
    m.reserve(2)
    m.advance(2)
    tables, free = [list(t) for t in m.tables], m.free_blocks()
    with pytest.raises(ValueError, match="2 new blocks of 2 but only 1 of 3 are free"):
        m.reserve(1)
    with pytest.raises(ValueError, match="max_len = 4"):
        m.reserve(3)
    assert m.tables == tables and m.free_blocks() == free and m.lengths().tolist() == [2, 2]


def test_advance_must_match_the_reservation():
    m = SlotMap(1, 4)
    m.reserve(2)
    with pytest.raises(ValueError, match="2 were reserved"):
        m.advance(1)


def test_free_checks_the_sequence_index():
    with pytest.raises(ValueError, match=r"seq must be in \[0, 2\)"):
        SlotMap(2, 4).free(2)


def test_visible_mask_is_bottom_right_per_sequence():
    m = visible_mask(np.array([2, 0]), 2, 4)
    assert m.shape == (2, 1, 2, 4)
    assert m[0, 0].astype(int).tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert m[1, 0].astype(int).tolist() == [[1, 0, 0, 0], [1, 1, 0, 0]]


def test_paged_and_contiguous_caches_give_the_same_logits():
    c = TransformerConfig(vocab_size=11, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=4, d_ff=8)
    params = init_params(c, 0, dtype="float64")
    tokens = np.random.default_rng(0).integers(0, 11, (3, 7))
    outs = []
    for kind in ("contiguous", "paged"):
        cache = layers.kv_cache(c, 3, 7, kind=kind, block_size=2, dtype="float64")
        outs.append(
            np.concatenate([layers.transformer(tokens[:, i : i + 1], params, c, cache=cache) for i in range(7)], 1)
        )
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(outs[0], layers.transformer(tokens, params, c), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("params_dtype", "batch", "error", "match"),
    [("float16", 1, TypeError, "the cache stores float32"), ("float32", 2, ValueError, "batch 2")],
)
def test_a_refused_cache_takes_no_block(params_dtype, batch, error, match):
    c = TransformerConfig(vocab_size=11, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4, d_ff=8)
    cache = layers.kv_cache(c, 1, 8, kind="paged", block_size=2, dtype="float32")
    with pytest.raises(error, match=match):
        layers.transformer(np.ones((batch, 3), dtype=np.int64), init_params(c, 0, dtype=params_dtype), c, cache=cache)
    assert (cache.free_blocks(), cache.block_table(0), cache.lengths().tolist()) == (4, [], [0])


def test_a_cache_of_another_backend_is_refused_by_name():
    class Other:
        name = "other"

    c = TransformerConfig(vocab_size=11, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4, d_ff=8)
    foreign = KVCache(Other(), c, SlotMap(1, 4), "float32")
    with pytest.raises(TypeError, match="made by the other backend; this is numpy"):
        layers.transformer(np.array([[1, 2]]), init_params(c, 0), c, cache=foreign)


def test_the_storage_is_made_on_the_first_write_and_contiguous_reads_are_views():
    c = TransformerConfig(vocab_size=11, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=4, d_ff=8)
    cache = layers.kv_cache(c, 2, 5, dtype="float64")
    assert cache.k == [] and cache.device is None
    cache.reserve(2)
    k = np.arange(2 * 2 * 4, dtype=np.float64).reshape(2, 2, 1, 4)
    k_all, v_all = cache.update(1, k, -k)
    np.testing.assert_array_equal(v_all, -k)
    assert [s.shape for s in cache.k] == [(1, 10, 4)] * 2  # (K, B·max_len, H) per layer: kv-head-major
    np.testing.assert_array_equal(k_all, k)
    assert np.shares_memory(k_all, cache.k[1])
    with pytest.raises(TypeError, match="k and v have dtypes float32, float32; the cache stores float64"):
        cache.update(0, k.astype(np.float32), k.astype(np.float32))


def test_row_groups_split_off_long_rows_only_when_that_saves_reads():
    from tensorglot.slot_map import GROUP_COST, row_groups

    short = np.array([3, 0, 5, 1, 2, 4, 6, 2])
    assert [g.tolist() for g in row_groups(short, 1)] == [list(range(8))]  # 8 × 7 keys: nothing to save
    mixed = short.copy()
    mixed[5] = 400  # padded: 8 × 401 keys; split: 7 × 7 + 401 (+ GROUP_COST)
    assert 7 * 7 + 401 + GROUP_COST < 8 * 401
    assert [g.tolist() for g in row_groups(mixed, 1)] == [[1, 3, 4, 7, 0, 2, 6], [5]]
    two = mixed.copy()
    two[0] = 390  # the second long row joins the long group: 6 × 7 + 2 × 401 beats 7 × 391 + 401
    assert [g.tolist() for g in row_groups(two, 1)] == [[1, 3, 4, 7, 2, 6], [0, 5]]
    with pytest.raises(ValueError, match=r"row_groups: lengths must be >= 0, got \[3, -1\]"):
        row_groups(np.array([3, -1]), 1)
    with pytest.raises(TypeError, match=r"row_groups: lengths must be a 1-D array of ints, got int64 \(1, 2\)"):
        row_groups(np.array([[3, 1]]), 1)
    with pytest.raises(ValueError, match="n must be"):
        row_groups(short, 0)


def test_read_takes_rows_as_far_as_their_longest_and_write_slots_checks_its_inputs():
    c = TransformerConfig(vocab_size=11, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=4, d_ff=8)
    cache = layers.kv_cache(c, 3, 8, kind="paged", block_size=2, dtype="float64")
    with pytest.raises(ValueError, match="nothing was written yet"):
        cache.read(0)
    layers.transformer(
        np.array([[1, 2, 3, 4], [5, 6, 7, 8], [9, 1, 2, 3]]), init_params(c, 0, dtype="float64"), c, cache=cache
    )
    cache.free(1)
    k_all, _ = cache.read(1)
    assert tuple(k_all.shape) == (3, 4, 1, 4)
    k02, _ = cache.read(1, np.array([2, 1]))  # row 2 then row 1 (empty): T = 4
    np.testing.assert_array_equal(k02[0], k_all[2])
    k1, _ = cache.read(0, np.array([1]))
    assert tuple(k1.shape) == (1, 0, 1, 4)
    with pytest.raises(ValueError, match=r"kv_cache.read: rows must be in \[0, 3\), got -1..0"):
        cache.read(0, np.array([0, -1]))  # NumPy would wrap -1 round to row 2
    with pytest.raises(ValueError, match=r"kv_cache.read: rows must be in \[0, 3\), got 3..3"):
        cache.read(0, np.array([3]))
    with pytest.raises(TypeError, match=r"kv_cache\.read: rows must be a 1-D NumPy array of ints, got float64"):
        cache.read(0, np.array([0.0]))
    with pytest.raises(ValueError, match=r"kv_cache\.read: rows must name at least one sequence"):
        cache.read(0, np.array([], dtype=np.int64))
    cache.reserve(1)
    with pytest.raises(ValueError, match=r"kv_cache.write: v has shape \(3, 1, 1, 5\)"):
        cache.write(0, np.zeros((3, 1, 1, 4)), np.zeros((3, 1, 1, 5)))
    cache.cancel()
    rows = np.ones((2, 2, 1, 4))
    cache.write_slots(np.array([10, 11]), rows, -rows)
    np.testing.assert_array_equal(cache.k[1][:, 10:12], np.moveaxis(rows[1], 1, 0))  # (K, slots, H)
    with pytest.raises(ValueError, match=r"\(L, n, K, H\) for the n slots"):
        cache.write_slots(np.array([10]), rows, rows)
    with pytest.raises(ValueError, match=r"slots must be in \[0, 24\)"):
        cache.write_slots(np.array([10, 24]), rows, rows)
    with pytest.raises(TypeError, match=r"kv_cache\.write_slots: slots must be a 1-D NumPy array of ints"):
        cache.write_slots(np.array(10), rows[:, :1], rows[:, :1])
    with pytest.raises(TypeError, match="the cache stores float64"):
        cache.write_slots(np.array([10, 11]), rows.astype(np.float32), rows.astype(np.float32))


def test_kernels_is_lazy_answers_as_array_api_compat_and_keeps_only_eager_types():
    import array_api_strict
    from array_api_compat import is_lazy_array

    from tensorglot import kernels

    a = array_api_strict.asarray([1.0, 2.0])
    assert kernels.is_lazy(a) is False and kernels.is_lazy(a) is False  # the probe's answer, then the memo's
    assert is_lazy_array(a) is False
    assert type(a) in kernels._EAGER
    jnp = pytest.importorskip("jax.numpy", reason="JAX is not installed: the lazy array type")
    j = jnp.asarray([1.0])
    assert kernels.is_lazy(j) is True and type(j) not in kernels._EAGER
