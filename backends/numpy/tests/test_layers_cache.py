"""The spec's shared cache bookkeeping (`SlotMap`, `PagedSlotMap`) and the NumPy cache built on it."""

from __future__ import annotations

import numpy as np
import pytest

import tensorglot
from tensorglot import TransformerConfig, init_params
from tensorglot.cache import PagedSlotMap, SlotMap, visible_mask

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
