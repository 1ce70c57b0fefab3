"""The xp flash kernels score only the tiles a causal query can see (the conformance suite checks the values)."""

from __future__ import annotations

import numpy as np
import pytest

from tensorglot_xp import flash
from tensorglot_xp.backend import XpBackend


def _scored_tiles(monkeypatch, S, T, **kw):
    """The (rows, cols) tiles the forward scores and how many the backward scores (block size 2)."""
    be = XpBackend("array_api_strict")
    scored = []
    real = flash._scores
    monkeypatch.setattr(flash, "_scores", lambda *a: scored.append((a[4], a[5])) or real(*a))
    rng = np.random.default_rng(0)
    q = be.asarray(rng.standard_normal((1, S, 1, 2)), "float64")
    k = be.asarray(rng.standard_normal((1, T, 1, 2)), "float64")
    be.ops.flash_attention(q, k, k, causal=True, block_size=2, **kw)
    forward = list(scored)
    scored.clear()
    be.ops.flash_attention_backward(q, k, k, q, causal=True, block_size=2, **kw)
    return forward, len(scored)


@pytest.mark.parametrize("S,T,visible_tiles", [(8, 8, 4 + 3 + 2 + 1), (2, 8, 4), (8, 4, 0 + 0 + 1 + 2)])
def test_causal_flash_skips_the_tiles_no_query_sees(monkeypatch, S, T, visible_tiles):
    """Query tile i (rows 2i, 2i + 1) sees key tiles up to the one holding key 2i + 1 + T − S."""
    forward, backward = _scored_tiles(monkeypatch, S, T)
    assert len(forward) == visible_tiles
    assert all(cols.start <= rows.stop - 1 + T - S for rows, cols in forward)
    assert backward == 2 * visible_tiles  # the forward again (for L), then each visible tile once


@pytest.mark.parametrize("S,T,window,visible_tiles", [(8, 8, 2, 1 + 2 + 2 + 2), (8, 8, 3, 1 + 2 + 2 + 2), (2, 8, 4, 3)])
def test_window_flash_skips_the_tiles_before_the_window(monkeypatch, S, T, window, visible_tiles):
    """Query tile i (rows at positions p = row + T − S) sees only keys p − W < j <= p."""
    forward, backward = _scored_tiles(monkeypatch, S, T, window=window)
    assert len(forward) == visible_tiles
    assert all(cols.stop - 1 > rows.start + T - S - window for rows, cols in forward)  # each tile sees a key
    assert backward == 2 * visible_tiles
