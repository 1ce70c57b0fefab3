"""The xp flash kernels score only the tiles a causal query can see (the conformance suite checks the values)."""

from __future__ import annotations

import numpy as np
import pytest

from tensorglot_xp import flash
from tensorglot_xp.backend import XpBackend


@pytest.mark.parametrize("S,T,visible_tiles", [(8, 8, 4 + 3 + 2 + 1), (2, 8, 4), (8, 4, 0 + 0 + 1 + 2)])
def test_causal_flash_skips_the_tiles_no_query_sees(monkeypatch, S, T, visible_tiles):
    """Block size 2: query tile i (rows 2i, 2i + 1) sees key tiles up to the one holding key 2i + 1 + T − S."""
    be = XpBackend("array_api_strict")
    scored = []
    real = flash._scores
    monkeypatch.setattr(flash, "_scores", lambda *a: scored.append((a[4], a[5])) or real(*a))
    rng = np.random.default_rng(0)
    q, k = (
        be.asarray(rng.standard_normal((1, S, 1, 2)), "float64"),
        be.asarray(rng.standard_normal((1, T, 1, 2)), "float64"),
    )
    be.ops.flash_attention(q, k, k, causal=True, block_size=2)
    assert len(scored) == visible_tiles
    assert all(cols.start <= rows.stop - 1 + T - S for rows, cols in scored)
    scored.clear()
    be.ops.flash_attention_backward(q, k, k, q, causal=True, block_size=2)
    assert len(scored) == 2 * visible_tiles  # the forward again (for L), then each visible tile once


@pytest.mark.parametrize("S,T,window,visible_tiles", [(8, 8, 2, 1 + 2 + 2 + 2), (8, 8, 3, 1 + 2 + 2 + 2), (2, 8, 4, 3)])
def test_window_flash_skips_the_tiles_before_the_window(monkeypatch, S, T, window, visible_tiles):
    """Block size 2: query tile i (rows 2i, 2i + 1 at positions p = row + T − S) sees keys p − W < j <= p."""
    be = XpBackend("array_api_strict")
    scored = []
    real = flash._scores
    monkeypatch.setattr(flash, "_scores", lambda *a: scored.append((a[4], a[5])) or real(*a))
    rng = np.random.default_rng(1)
    q, k = (
        be.asarray(rng.standard_normal((1, S, 1, 2)), "float64"),
        be.asarray(rng.standard_normal((1, T, 1, 2)), "float64"),
    )
    be.ops.flash_attention(q, k, k, causal=True, window=window, block_size=2)
    assert len(scored) == visible_tiles
    assert all(cols.stop - 1 > rows.start + T - S - window for rows, cols in scored)  # each tile sees a key
    scored.clear()
    be.ops.flash_attention_backward(q, k, k, q, causal=True, window=window, block_size=2)
    assert len(scored) == 2 * visible_tiles
