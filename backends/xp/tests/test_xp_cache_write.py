"""The xp cache write: in place through a boolean mask where the namespace can write, else a gather.

The conformance suite runs xp on array_api_strict and NumPy, both writable, so the gather that a namespace
without mutation takes (JAX, or a read-only NumPy array) is checked here; NumPy's own fancy assignment is
the oracle for both paths."""

from __future__ import annotations

import array_api_strict
import numpy as np
import pytest
from array_api_compat import is_writeable_array

from tensorglot_xp.layers import cache_write

SLOTS, K, H = 24, 2, 3
RNG = np.random.default_rng(0)


def _case(slots):
    storage = RNG.standard_normal((K, SLOTS, H)).astype(np.float32)  # kv-head-major, as the cache's
    rows = RNG.standard_normal((K, len(slots), H)).astype(np.float32)
    expected = storage.copy()
    # NumPy's scatter: row i lands at slots[i], the last of a repeated slot's rows wins; reversed, the first
    expected[:, np.asarray(slots)[::-1]] = rows[:, ::-1]
    return storage, np.asarray(slots, dtype=np.int64), rows, expected


# in order (a contiguous cache's step), out of order (a paged cache's blocks), one slot, the first and last,
# and a repeated slot (a serving pool's idle rows all write to its scratch block): its first row is kept
CASES = [[3, 4, 5, 11], [17, 2, 9, 0], [7], [0, SLOTS - 1], [5, 20, 20, 1, 20]]


@pytest.mark.parametrize("slots", CASES)
@pytest.mark.parametrize("library", ["numpy", "array_api_strict"])
def test_a_writable_namespace_is_written_in_place(library, slots):
    storage, idx, rows, expected = _case(slots)
    wrap = (lambda a: a) if library == "numpy" else array_api_strict.asarray
    s = wrap(storage)
    out = cache_write(s, wrap(idx), wrap(rows))
    np.testing.assert_array_equal(np.asarray(out), expected)
    np.testing.assert_array_equal(np.asarray(s), expected)  # written in place, not a copy of every slot


@pytest.mark.parametrize("slots", CASES)
def test_a_read_only_array_is_gathered_into_a_new_one(slots):
    storage, idx, rows, expected = _case(slots)
    before = storage.copy()
    storage.flags.writeable = False
    assert not is_writeable_array(storage)
    out = cache_write(storage, idx, rows)
    assert out is not storage
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(storage, before)  # the input is untouched


def test_jax_arrays_take_the_gather():
    jnp = pytest.importorskip("jax.numpy", reason="JAX is not installed: the namespace without mutation")
    storage, idx, rows, expected = _case([17, 2, 9, 0])
    out = cache_write(jnp.asarray(storage), jnp.asarray(idx), jnp.asarray(rows))
    np.testing.assert_array_equal(np.asarray(out), expected)


def test_the_plan_made_for_one_slots_array_serves_its_step_only():
    # A step writes every layer's keys and values at one slots array, so its plan is kept for that array;
    # the next step's slots (a new array, equal length) must not reuse it.
    (k, idx, rows, want_k), (v, _, rows_v, _) = _case([3, 4, 5, 11]), _case([3, 4, 5, 11])
    want_v = v.copy()
    want_v[:, idx] = rows_v
    cache_write(k, idx, rows)
    cache_write(v, idx, rows_v)
    np.testing.assert_array_equal(k, want_k)
    np.testing.assert_array_equal(v, want_v)
    nxt = np.array([6, 7, 8, 12])
    cache_write(k, nxt, -rows)
    want_k[:, nxt] = -rows
    np.testing.assert_array_equal(k, want_k)
