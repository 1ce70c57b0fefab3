"""`tensorglot.serving.prefix.PrefixCache`: keys chained over the whole prefix, the longest stored chain
matched (never the last token), pinned blocks never evicted, the least recently used evicted first."""

from __future__ import annotations

import numpy as np
import pytest

from tensorglot.serving.prefix import PrefixCache, block_keys


def _kv(prompt: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    x = np.asarray(prompt, dtype=np.float32)[:, None, None]  # (P, 1, 1): the "KV" is the token id
    return [x, 2 * x], [3 * x, 4 * x]


def test_a_key_names_the_whole_prefix():
    a, b = block_keys(np.array([1, 2, 3, 4, 5, 6]), 2), block_keys(np.array([9, 9, 3, 4, 5, 6]), 2)
    assert len(a) == 3 and a[0] != b[0] and a[1] != b[1]  # same block tokens, other prefix: other key
    assert block_keys(np.array([1, 2, 3, 4, 5]), 2) == a[:2]  # a partial block has no key


def test_match_takes_the_longest_chain_and_leaves_the_last_token():
    cache = PrefixCache(block_size=2, capacity=10)
    first = np.array([1, 2, 3, 4, 5, 6])
    cache.store(first, *_kv(first))
    blocks = cache.match(np.array([1, 2, 3, 4, 7, 8]))
    assert [b.k[0][:, 0, 0].tolist() for b in blocks] == [[1, 2], [3, 4]] and blocks[1].v[1][0, 0, 0] == 4 * 3
    assert len(cache.match(first)) == 2  # the third block holds the last token: it is computed
    assert cache.match(np.array([2, 2, 3, 4, 5])) == []
    assert cache.stats["matched_tokens"] == 8


def test_eviction_is_lru_and_spares_pinned_blocks():
    cache = PrefixCache(block_size=2, capacity=2)
    p, q = np.array([1, 2, 3, 4, 0]), np.array([5, 6, 0])
    cache.store(p, *_kv(p))
    pinned = cache.match(p)  # both of p's blocks, now pinned and most recent
    cache.store(q, *_kv(q))  # over capacity, but p's blocks are pinned: q's is the only candidate
    assert len(cache.blocks) == 2 and cache.match(q) == [] and cache.stats["evicted_blocks"] == 1
    cache.unpin(pinned)
    cache.store(q, *_kv(q))  # now the least recently used of p's goes
    assert len(cache.blocks) == 2 and len(cache.match(q)) == 1 and len(cache.match(p)) == 0


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="capacity"):
        PrefixCache(block_size=4, capacity=0)
