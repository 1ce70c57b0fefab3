"""Blockwise (flash) attention equals the naive attention of the reference: outputs and gradients, every
convention (GQA, bottom-right causal, masks, queries that see nothing, S ≠ T), at block sizes that do and do
not divide S and T; its backward against float64 central differences."""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import pytest

from ._harness import assert_close, central_differences

pytestmark = pytest.mark.requires("flash")

# id: (B, S, T, N, K, H, causal, mask[, options]) — mask is None, "random" (some rows fully masked) or
# "padding"; options are softcap and window.
SHAPES: dict[str, tuple[Any, ...]] = {
    "mha": (2, 5, 5, 2, 2, 4, False, None),
    "mha-causal": (1, 9, 9, 2, 2, 3, True, None),
    "gqa-causal-decode": (1, 3, 8, 4, 2, 3, True, None),  # S < T: a cache of T − S earlier keys
    "mqa-causal-s-gt-t": (2, 7, 4, 3, 1, 4, True, None),  # S > T: the first S − T queries see nothing
    "gqa-random-mask": (2, 6, 7, 4, 2, 3, False, "random"),
    "gqa-padding-causal": (3, 6, 6, 2, 1, 4, True, "padding"),
    "mqa-window-s-gt-t": (2, 9, 5, 2, 1, 3, True, None, {"window": 2}),
    "mha-softcap": (1, 5, 6, 2, 2, 3, False, None, {"softcap": 0.8}),
    "gqa-window-decode": (1, 4, 11, 4, 2, 3, True, None, {"window": 5}),  # S < T: the window slides past tiles
    "gqa-window-softcap-random-mask": (2, 10, 10, 4, 2, 3, True, "random", {"window": 3, "softcap": 1.2}),
}
BLOCK_SIZES = (3, 4, 1, 128)  # 3 and 4 divide neither all S nor all T; 128 is one tile


def _make(id: str, block_size: int) -> tuple[list[np.ndarray], dict[str, Any]]:
    B, S, T, N, K, H, causal, mask, *options = SHAPES[id]
    rng = np.random.default_rng(zlib.crc32(f"{id}-{block_size}".encode()))
    kw: dict[str, Any] = {"causal": causal, **(options[0] if options else {})}
    if mask == "random":
        m = rng.random((B, N, S, T)) < 0.6
        m[0, 1, 2] = False  # at least one query that sees no key
        kw["mask"] = m
    elif mask == "padding":
        lengths = np.array([0, 2, T])[:B]  # an empty sequence, a short one, a full one
        kw["mask"] = (np.arange(T)[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, T)
    args = [rng.standard_normal((B, S, N, H)), rng.standard_normal((B, T, K, H)), rng.standard_normal((B, T, K, H))]
    return args, kw


# Each shape at one block size (compiling backends pay per shape); the sizes cycle so every one is used.
CASES = [(id, BLOCK_SIZES[n % len(BLOCK_SIZES)]) for n, id in enumerate(SHAPES)]
IDS = [f"{id}-block{bs}" for id, bs in CASES]


def _flash(harness, args, kw, dtype, block_size):
    return harness.call("ops", "flash_attention", args, dict(kw, block_size=block_size), dtype)


@pytest.mark.parametrize("id,block_size", CASES, ids=IDS)
def test_forward_equals_naive_attention(harness, dtype, id, block_size):
    args, kw = _make(id, block_size)
    out = _flash(harness, args, kw, dtype, block_size)
    assert harness.backend.dtype_name(out) == dtype
    expected = harness.call_ref("ops", "attention", args, kw, dtype)
    # As attention's cases: two reductions (over H, then over T) in another order.
    assert_close(harness.get(out), expected, dtype, scale=2.0, what=f"flash {id} forward")


@pytest.mark.parametrize("id,block_size", CASES, ids=IDS)
def test_backward_equals_naive_attention_backward(harness, dtype, id, block_size):
    args, kw = _make(id, block_size)
    dy = np.random.default_rng(1).standard_normal(args[0].shape)
    grads = harness.call("ops", "flash_attention_backward", [*args, dy], dict(kw, block_size=block_size), dtype)
    expected = harness.call_ref("ops", "attention_backward", [*args, dy], kw, dtype)
    assert len(grads) == 3
    for name, g, e in zip(("dq", "dk", "dv"), grads, expected):
        assert harness.backend.dtype_name(g) == dtype
        # One more chained reduction than the forward, as attention's gradient cases.
        assert_close(harness.get(g), e, dtype, scale=4.0, what=f"flash {id} {name}")


@pytest.mark.requires("float64")
@pytest.mark.parametrize(
    "id", ["gqa-causal-decode", "mqa-causal-s-gt-t", "gqa-random-mask", "gqa-window-decode", "mha-softcap"]
)
def test_backward_matches_central_differences(harness, id):
    args, kw = _make(id, 3)
    kw_b = {k: harness.put(v, "float64") for k, v in dict(kw, block_size=3).items()}
    flash = harness.backend.ops.flash_attention

    def forward(inputs):
        return harness.get(flash(*(harness.put(a, "float64") for a in inputs), **kw_b))

    dy = np.random.default_rng(2).standard_normal(args[0].shape)
    numeric = central_differences(forward, [a.copy() for a in args], dy, (0, 1, 2))
    analytic = harness.backend.ops.flash_attention_backward(*(harness.put(a, "float64") for a in [*args, dy]), **kw_b)
    for name, a, n in zip(("dq", "dk", "dv"), analytic, numeric):
        np.testing.assert_allclose(harness.get(a), n, rtol=1e-5, atol=1e-7, err_msg=f"flash {id}: {name}")


def test_query_that_sees_nothing_gives_zeros_and_no_gradient(harness):
    B, S, T, N, H = 1, 4, 4, 2, 3
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((B, S, N, H)) for _ in range(3))
    mask = np.ones((B, N, S, T), dtype=bool)
    mask[0, 1, 2] = False  # head 1, query 2 sees no key
    dy = rng.standard_normal(q.shape)
    kw = {"mask": mask, "block_size": 2}
    out = harness.get(harness.call("ops", "flash_attention", [q, k, v], kw, "float32"))
    dq, _, dv = (harness.get(g) for g in harness.call("ops", "flash_attention_backward", [q, k, v, dy], kw, "float32"))
    assert np.all(out[0, 2, 1] == 0.0) and np.all(np.isfinite(out))
    assert np.all(dq[0, 2, 1] == 0.0) and np.all(np.isfinite(dq))
    # dv only gathers from queries that saw something: zeroing dy of the dead query changes nothing.
    dy2 = dy.copy()
    dy2[0, 2, 1] = 0.0
    dv2 = harness.get(harness.call("ops", "flash_attention_backward", [q, k, v, dy2], kw, "float32")[2])
    np.testing.assert_array_equal(dv, dv2)


@pytest.mark.parametrize("block_size", [1, 2, 5, 16])
def test_result_does_not_depend_on_block_size(harness, block_size):
    rng = np.random.default_rng(4)
    q, k, v = rng.standard_normal((2, 11, 4, 4)), rng.standard_normal((2, 13, 2, 4)), rng.standard_normal((2, 13, 2, 4))

    def flash(bs):
        out = harness.call("ops", "flash_attention", [q, k, v], {"causal": True, "block_size": bs}, "float32")
        return harness.get(out)

    one_tile, tiled = flash(64), flash(block_size)
    assert_close(tiled, one_tile, "float32", scale=2.0, what=f"block_size {block_size} vs one tile")


@pytest.mark.parametrize("block_size", [0, -1, 2.5, True])
def test_bad_block_size_raises(backend, block_size):
    q = backend.asarray(np.zeros((1, 2, 1, 2)), "float32")
    with pytest.raises((ValueError, TypeError), match="flash_attention: block_size"):
        backend.ops.flash_attention(q, q, q, block_size=block_size)


def test_bad_shapes_raise_as_attention_does(backend):
    q = backend.asarray(np.zeros((1, 2, 3, 2)), "float32")
    k = backend.asarray(np.zeros((1, 2, 2, 2)), "float32")
    with pytest.raises(ValueError, match="flash_attention: q has N = 3 heads and k has K = 2"):
        backend.ops.flash_attention(q, k, k)
    with pytest.raises(ValueError, match="flash_attention_backward: dy"):
        backend.ops.flash_attention_backward(q, q, q, backend.asarray(np.zeros((1, 2, 3, 3)), "float32"))


@pytest.mark.parametrize("s,t", [(16, 16), (4, 16)])
def test_window_skips_the_key_tiles_it_hides(harness, s, t):
    """Keys and values in the tiles no query of a tile can see through the window never enter its sums:
    NaN there leaves the later query tiles (and their gradients) exactly as without it."""
    rng = np.random.default_rng(5)
    q, k, v = rng.standard_normal((1, s, 2, 3)), rng.standard_normal((1, t, 1, 3)), rng.standard_normal((1, t, 1, 3))
    dy = rng.standard_normal(q.shape)
    kw = {"causal": True, "window": 3, "block_size": 4}
    k_bad, v_bad = k.copy(), v.copy()
    k_bad[:, :4], v_bad[:, :4] = np.nan, np.nan  # the first key tile, which queries at i + T − S >= 7 never see
    later = slice(s - 4, s)  # the last query tile sees keys from (s − 4) + (T − S) − 2 = T − 6 >= 10 on

    def run(k, v):
        out = harness.get(harness.call("ops", "flash_attention", [q, k, v], kw, "float32"))
        dq = harness.get(harness.call("ops", "flash_attention_backward", [q, k, v, dy], kw, "float32")[0])
        return out[:, later], dq[:, later]

    for clean, poisoned, what in zip(run(k, v), run(k_bad, v_bad), ("output", "dq")):
        assert np.all(np.isfinite(poisoned)), f"flash {what}: a hidden key tile was read"
        np.testing.assert_array_equal(poisoned, clean, err_msg=f"flash {what}")


def test_bad_window_raises_as_attention_does(backend):
    q = backend.asarray(np.zeros((1, 2, 1, 2)), "float32")
    with pytest.raises(ValueError, match=r"flash_attention: window .* causal=True"):
        backend.ops.flash_attention(q, q, q, window=2)
    with pytest.raises(ValueError, match="flash_attention_backward: softcap must be a finite number > 0"):
        backend.ops.flash_attention_backward(q, q, q, q, softcap=0.0)
