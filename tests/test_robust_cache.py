"""Issue 14: no failed call changes a KV cache, even when the failure comes from a kernel after
``reserve`` (the validation failures are held on every backend by ``conformance/test_edges.py``)."""

from __future__ import annotations

import numpy as np
import pytest

import tensorglot


class _Failing:
    """The numpy kernels, with attention raising: a failure in the middle of a cached step."""

    def __init__(self, kernels):
        self._kernels = kernels

    def __getattr__(self, name):
        if name == "attention":

            def attention(*args):
                raise RuntimeError("attention failed on purpose")

            return attention
        return getattr(self._kernels, name)


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_a_kernel_failure_after_reserve_gives_the_blocks_back(monkeypatch, kind):
    be = tensorglot.get_backend("numpy")
    config = tensorglot.TransformerConfig(
        vocab_size=13, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=4, d_ff=16, max_seq_len=16
    )
    params = tensorglot.init_params(config, 0)
    cache = be.layers.kv_cache(config, 2, 8, kind=kind, block_size=2)
    be.layers.transformer(np.array([[1, 2], [3, 4]]), params, config, cache=cache)

    def state():
        tables = [cache.block_table(b) for b in range(2)] if kind == "paged" else None
        return cache.lengths().tolist(), tables, cache.map.pending, kind == "paged" and cache.free_blocks()

    before = state()
    monkeypatch.setattr(be.layers, "_k", _Failing(be.layers._k))
    with pytest.raises(RuntimeError, match="on purpose"):
        be.layers.transformer(np.array([[5, 6, 7], [8, 9, 10]]), params, config, cache=cache)  # needs new blocks
    assert state() == before
    monkeypatch.undo()
    expected = be.layers.transformer(np.array([[1, 2, 5]]), params, config)[:, -1]
    got = be.layers.transformer(np.array([[5], [5]]), params, config, cache=cache)[:1, -1]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)  # the cache still decodes correctly
