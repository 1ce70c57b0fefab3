"""Laws that need no oracle: they hold for any correct implementation, whatever the reference says."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ._harness import assert_close


def _get(backend, x):
    return np.asarray(backend.to_numpy(x), dtype=np.float64)


shapes = st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple)
seeds = st.integers(0, 2**32 - 1)


# -- softmax ---------------------------------------------------------------------------------------


@given(shape=shapes, seed=seeds)
def test_softmax_rows_sum_to_one_and_shift_invariant(backend, shape, seed):
    x = np.random.default_rng(seed).standard_normal(shape) * 10
    y = _get(backend, backend.ops.softmax(backend.asarray(x, "float32"), axis=-1))
    assert np.all(y >= 0)
    assert_close(y.sum(-1), np.ones(shape[:-1]), "float32", what="softmax rows sum to 1")
    shifted = _get(backend, backend.ops.softmax(backend.asarray(x + 1000.0, "float32"), axis=-1))
    assert_close(shifted, y, "float32", scale=200, what="softmax(x + 1000) == softmax(x)")  # x+1000 rounds at 6e-5


def test_softmax_large_inputs_do_not_overflow(backend):
    x = backend.asarray(np.array([[1000.0, 1000.0], [-1000.0, 0.0]]), "float32")
    y = _get(backend, backend.ops.softmax(x))
    assert_close(y, [[0.5, 0.5], [0.0, 1.0]], "float32", what="max subtraction")


def test_fully_masked_row_gives_zeros(backend):
    x = backend.asarray(np.array([[-np.inf, -np.inf, -np.inf], [0.0, -np.inf, 0.0]]), "float32")
    y = _get(backend, backend.ops.softmax(x))
    np.testing.assert_array_equal(y, [[0.0, 0.0, 0.0], [0.5, 0.0, 0.5]])


def test_nan_in_gives_nan_out(backend):
    y = _get(backend, backend.ops.softmax(backend.asarray(np.array([[0.0, np.nan], [1.0, 2.0]]), "float32")))
    assert np.isnan(y[0]).all() and not np.isnan(y[1]).any()


def test_softmax_empty_axis(backend):
    y = backend.ops.softmax(backend.asarray(np.zeros((3, 0)), "float32"))
    assert tuple(_get(backend, y).shape) == (3, 0)


# -- rms_norm --------------------------------------------------------------------------------------


@given(seed=seeds, a=st.floats(0.01, 100.0))
def test_rms_norm_is_scale_invariant(backend, seed, a):
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal((3, 16)), rng.standard_normal(16)
    y1 = _get(backend, backend.ops.rms_norm(backend.asarray(x, "float32"), backend.asarray(w, "float32"), eps=1e-12))
    y2 = _get(
        backend,
        backend.ops.rms_norm(backend.asarray(a * x, "float32"), backend.asarray(w, "float32"), eps=1e-12),
    )
    assert_close(y2, y1, "float32", scale=4, what="rms_norm(a·x) == rms_norm(x)")


def test_rms_norm_casts_before_weight(backend):
    """Llama's order: normalise in float32, cast to float16, then multiply by the weight (in float16)."""
    if "float16" not in backend.capabilities:
        pytest.skip(f"backend {backend.name!r} lacks capability 'float16'")
    x = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float16)
    w = np.array([3.1, 0.7, 1.9, 2.3], dtype=np.float16)
    x32 = x.astype(np.float32)
    normalised = (x32 / np.sqrt(np.mean(x32 * x32, -1, keepdims=True) + 1e-6)).astype(np.float16)
    expected = normalised * w  # float16 × float16
    got = backend.to_numpy(backend.ops.rms_norm(backend.asarray(x, "float16"), backend.asarray(w, "float16")))
    np.testing.assert_array_equal(np.asarray(got, dtype=np.float16), expected)


def test_rms_norm_with_an_offset_casts_after_the_weight(backend):
    """Gemma's order (HF ``x_norm_fp32 * (1.0 + w.float())``, then cast): offset + w and the product stay in
    float32 and only the result is rounded to float16, which here differs from Llama's order in 3 places."""
    if "float16" not in backend.capabilities:
        pytest.skip(f"backend {backend.name!r} lacks capability 'float16'")
    x = np.array([[1.0, 2.0, 3.0, 4.0], [0.3, -1.7, 2.2, 0.9]], dtype=np.float16)
    w = np.array([0.1, -0.3, 0.9, 1.3], dtype=np.float16)
    x32 = x.astype(np.float32)
    normalised = x32 / np.sqrt(np.mean(x32 * x32, -1, keepdims=True) + 1e-6)
    expected = (normalised * (np.float32(1.0) + w.astype(np.float32))).astype(np.float16)
    xs, ws = backend.asarray(x, "float16"), backend.asarray(w, "float16")
    got = np.asarray(backend.to_numpy(backend.ops.rms_norm(xs, ws, offset=1.0)), dtype=np.float16)
    np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(expected, normalised.astype(np.float16) * (np.float16(1.0) + w))  # Llama's order


@given(seed=seeds, offset=st.sampled_from([1.0, -0.5, 3.0]))
def test_rms_norm_offset_is_added_to_the_weight(backend, seed, offset):
    rng = np.random.default_rng(seed)
    x, w = backend.asarray(rng.standard_normal((3, 8)), "float32"), rng.standard_normal(8)
    got = _get(backend, backend.ops.rms_norm(x, backend.asarray(w, "float32"), offset=offset))
    want = _get(backend, backend.ops.rms_norm(x, backend.asarray(offset + w, "float32")))
    assert_close(got, want, "float32", scale=2, what=f"rms_norm(x, w, offset={offset}) == rms_norm(x, offset + w)")


# -- rope ------------------------------------------------------------------------------------------


def _rope(backend, x, **kw):
    if "positions" in kw and kw["positions"] is not None:
        kw["positions"] = backend.asarray(np.asarray(kw["positions"]), "int32")
    return _get(
        backend,
        backend.encodings.rope(backend.asarray(x, "float64" if "float64" in backend.capabilities else "float32"), **kw),
    )


@given(seed=seeds, style=st.sampled_from(["interleaved", "neox"]), rot=st.sampled_from([None, 2, 4]))
def test_rope_keeps_norms(backend, seed, style, rot):
    x = np.random.default_rng(seed).standard_normal((1, 6, 2, 8))
    y = _rope(backend, x, style=style, rotary_dim=rot, positions=np.arange(6) * 7)
    assert_close(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), "float32", what="|rope(x)| == |x|")


@pytest.mark.parametrize("style", ["interleaved", "neox"])
def test_rope_is_identity_at_position_zero(backend, style):
    x = np.random.default_rng(1).standard_normal((2, 1, 3, 8))
    assert_close(_rope(backend, x, style=style), x, "float32", what="rope at position 0")


@given(seed=seeds, style=st.sampled_from(["interleaved", "neox"]), shift=st.integers(1, 50))
def test_rope_dot_product_depends_only_on_distance(backend, seed, style, shift):
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((1, 1, 1, 8)), rng.standard_normal((1, 1, 1, 8))

    def dot(pq, pk):
        rq = _rope(backend, q, style=style, positions=[pq])
        rk = _rope(backend, k, style=style, positions=[pk])
        return float(np.sum(rq * rk))

    assert dot(5, 2) == pytest.approx(dot(5 + shift, 2 + shift), rel=1e-4, abs=1e-5)


def test_rope_rotates_by_plus_angle(backend):
    """Pinned sign: the pair (1, 0) at position p with θ = 1 goes to (cos p, sin p)."""
    x = np.zeros((1, 1, 1, 2))
    x[..., 0] = 1.0
    y = _rope(backend, x, positions=[1], theta=1.0)
    assert_close(y.ravel(), [np.cos(1.0), np.sin(1.0)], "float32", what="rotation by +angle")


@given(seed=seeds, rot=st.sampled_from([4, 8]))
def test_interleaved_and_neox_agree_under_permutation(backend, seed, rot):
    """Pairs (2i, 2i+1) of x are pairs (i, i + r/2) of x[..., P] with P = [0, 2, 4, ..., 1, 3, 5, ...]."""
    x = np.random.default_rng(seed).standard_normal((2, 5, 2, 8))
    perm = np.concatenate([np.arange(0, rot, 2), np.arange(1, rot, 2), np.arange(rot, 8)])
    inter = _rope(backend, x, style="interleaved", rotary_dim=rot)
    neox = _rope(backend, x[..., perm], style="neox", rotary_dim=rot)
    assert_close(neox, inter[..., perm], "float32", what="neox(x[P]) == interleaved(x)[P]")


def test_rope_partial_passes_tail_through(backend):
    # float32-representable values, so the tail is comparable exactly on a float32-only backend too.
    x = np.random.default_rng(2).standard_normal((1, 4, 1, 8)).astype(np.float32).astype(np.float64)
    y = _rope(backend, x, style="neox", rotary_dim=4)
    np.testing.assert_array_equal(y[..., 4:], x[..., 4:])


# -- attention -------------------------------------------------------------------------------------


def _attn(backend, q, k, v, **kw):
    dt = "float64" if "float64" in backend.capabilities else "float32"
    if kw.get("mask") is not None:
        kw["mask"] = backend.asarray(kw["mask"], "bool")
    return _get(backend, backend.ops.attention(*(backend.asarray(a, dt) for a in (q, k, v)), **kw))


@given(seed=seeds, t=st.integers(0, 4))
def test_causal_output_ignores_later_inputs(backend, seed, t):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, 5, 2, 4)) for _ in range(3))
    base = _attn(backend, q, k, v, causal=True)
    q2, k2, v2 = q.copy(), k.copy(), v.copy()
    for a in (q2, k2, v2):
        a[:, t + 1 :] = rng.standard_normal(a[:, t + 1 :].shape)
    changed = _attn(backend, q2, k2, v2, causal=True)
    assert_close(changed[:, : t + 1], base[:, : t + 1], "float32", what=f"outputs up to position {t}")


def test_causal_is_bottom_right_aligned(backend):
    """Decoding S new queries after T − S cached keys equals the last S rows of the full causal pass."""
    rng = np.random.default_rng(3)
    q, k, v = (
        rng.standard_normal((1, 6, 2, 4)),
        rng.standard_normal((1, 6, 2, 4)),
        rng.standard_normal((1, 6, 2, 4)),
    )
    full = _attn(backend, q, k, v, causal=True)
    tail = _attn(backend, q[:, 4:], k, v, causal=True)
    assert_close(tail, full[:, 4:], "float32", what="bottom-right causal")
    mask = _get(backend, backend.ops.causal_mask(2, 6)).astype(bool)
    np.testing.assert_array_equal(mask, np.tril(np.ones((6, 6), bool))[4:])


def test_gqa_equals_mha_with_repeated_kv_heads(backend):
    rng = np.random.default_rng(4)
    q = rng.standard_normal((2, 3, 6, 4))
    k, v = rng.standard_normal((2, 5, 2, 4)), rng.standard_normal((2, 5, 2, 4))
    gqa = _attn(backend, q, k, v, causal=True)
    mha = _attn(backend, q, np.repeat(k, 3, axis=2), np.repeat(v, 3, axis=2), causal=True)
    assert_close(gqa, mha, "float32", what="query head h reads kv head h // (N // K)")


def test_query_that_sees_nothing_outputs_zeros(backend):
    rng = np.random.default_rng(5)
    q, k, v = (
        rng.standard_normal((1, 3, 1, 2)),
        rng.standard_normal((1, 3, 1, 2)),
        rng.standard_normal((1, 3, 1, 2)),
    )
    mask = np.ones((1, 1, 3, 3), bool)
    mask[0, 0, 1] = False
    out = _attn(backend, q, k, v, mask=mask)
    np.testing.assert_array_equal(out[0, 1], 0.0)
    assert np.all(np.isfinite(out))


def test_padding_mask_masks_the_padding(backend):
    m = np.asarray(backend.to_numpy(backend.ops.padding_mask(backend.asarray(np.array([0, 2, 3]), "int32"), 3)))
    assert m.shape == (3, 1, 1, 3) and m.dtype == bool
    np.testing.assert_array_equal(m[:, 0, 0], [[0, 0, 0], [1, 1, 0], [1, 1, 1]])
    rng = np.random.default_rng(6)
    q, k, v = (
        rng.standard_normal((3, 2, 1, 2)),
        rng.standard_normal((3, 3, 1, 2)),
        rng.standard_normal((3, 3, 1, 2)),
    )
    out = _attn(backend, q, k, v, mask=m)
    ref = _attn(backend, q[1:2], k[1:2, :2], v[1:2, :2])
    assert_close(out[1:2], ref, "float32", what="padding equals truncation")


# -- softcap and sliding windows -------------------------------------------------------------------


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


@given(seed=seeds, cap=st.floats(0.1, 30.0))
def test_softcapped_logits_are_bounded_by_the_cap_and_monotone(backend, seed, cap):
    """Two keys, k = (0, 1) and v = (0, 1): query i outputs sigmoid(ℓ_i) for its capped logit ℓ_i of the raw
    logit q_i (the other logit is cap·tanh(0) = 0), so the outputs show the cap's image of sorted raw logits."""
    raw = np.sort(np.random.default_rng(seed).standard_normal(12) * cap * 3)
    raw = np.concatenate([[-1e30], raw, [1e30]])  # the limits: exactly ±cap
    q = raw.reshape(1, -1, 1, 1)
    k = v = np.array([0.0, 1.0]).reshape(1, 2, 1, 1)
    out = _attn(backend, q, k, v, scale=1.0, softcap=cap).ravel()
    lo, hi = _sigmoid(-cap), _sigmoid(cap)
    assert np.all(np.diff(out) >= -1e-6), f"softcap must keep the logits' order, got {out}"
    assert np.all(out >= lo * (1 - 1e-5) - 1e-7) and np.all(out <= hi * (1 + 1e-5) + 1e-7), (lo, hi, out)
    assert_close(out[[0, -1]], [lo, hi], "float32", what="cap · tanh(±∞) = ±cap")


@given(seed=seeds, s=st.integers(1, 6), t=st.integers(1, 6), extra=st.integers(0, 3))
def test_window_at_least_t_is_full_causal_attention(backend, seed, s, t, extra):
    rng = np.random.default_rng(seed)
    q, k, v = rng.standard_normal((2, s, 4, 3)), rng.standard_normal((2, t, 2, 3)), rng.standard_normal((2, t, 2, 3))
    causal = _attn(backend, q, k, v, causal=True)
    assert_close(_attn(backend, q, k, v, causal=True, window=t + extra), causal, "float32", what=f"window {t + extra}")


@pytest.mark.parametrize("s,t", [(4, 4), (2, 5), (5, 3)])
def test_window_one_attends_only_the_diagonal(backend, s, t):
    """Query i sees key i + T − S alone, so it outputs that value (zeros where i + T − S < 0)."""
    rng = np.random.default_rng(7)
    q, k, v = rng.standard_normal((1, s, 4, 3)), rng.standard_normal((1, t, 2, 3)), rng.standard_normal((1, t, 2, 3))
    out = _attn(backend, q, k, v, causal=True, window=1)
    want = np.zeros_like(out)
    for i in range(s):
        if i + t - s >= 0:
            want[0, i] = np.repeat(v[0, i + t - s], 2, axis=0)  # query head h reads kv head h // 2
    assert_close(out, want, "float32", what="window=1")


@given(seed=seeds, w=st.integers(1, 4))
def test_window_hides_the_keys_before_it(backend, seed, w):
    """Changing the keys and values at j <= i + T − S − W leaves query i's output unchanged."""
    rng = np.random.default_rng(seed)
    s, t = 3, 7
    q, k, v = rng.standard_normal((1, s, 2, 4)), rng.standard_normal((1, t, 1, 4)), rng.standard_normal((1, t, 1, 4))
    base = _attn(backend, q, k, v, causal=True, window=w)
    first = t - s - w + 1  # the first key query 0 sees; earlier keys are hidden from every query
    if first > 0:
        k2, v2 = k.copy(), v.copy()
        k2[:, :first], v2[:, :first] = rng.standard_normal((2, 1, first, 1, 4)) * 5
        assert_close(_attn(backend, q, k2, v2, causal=True, window=w), base, "float32", what="hidden keys")


@pytest.mark.parametrize("s,t,w", [(5, 5, 2), (2, 6, 3), (6, 3, 2)])
def test_causal_mask_with_window_is_what_the_window_attends(backend, s, t, w):
    mask = _get(backend, backend.ops.causal_mask(s, t, window=w)).astype(bool)
    i, j = np.arange(s)[:, None] + t - s, np.arange(t)[None, :]
    np.testing.assert_array_equal(mask, (j <= i) & (j > i - w))
    rng = np.random.default_rng(8)
    q, k, v = rng.standard_normal((1, s, 2, 3)), rng.standard_normal((1, t, 2, 3)), rng.standard_normal((1, t, 2, 3))
    assert_close(
        _attn(backend, q, k, v, mask=mask), _attn(backend, q, k, v, causal=True, window=w), "float32", what="mask"
    )
