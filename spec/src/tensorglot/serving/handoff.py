"""The decode side of a KV handoff with prefix caching: the decode worker's own prefix blocks.

A decode worker keeps the full KV blocks of the prompts it has held in a `PrefixCache` (chained block
keys, pinned while used, least recently used evicted past ``--prefix-cache-blocks``). The router mirrors
that cache (`tensorglot.serving.mirror`) and, when it routes a request there, tells the prefill worker how
many prompt tokens the decode worker supplies (``supplied``, whole blocks); the prefill worker sends only
the KV past them, and the decode worker assembles the whole KV from its blocks and the received tail.

Requests reach a decode worker from several prefill workers in any order, but the mirror changed in the
order the router routed them. So the router numbers each decode worker's requests (``seq``) and the
decode worker applies their cache operations — match, assemble, store, unpin, exactly what the mirror
did — in that order (`turns`): a request whose tail arrives early waits for its turn, unless it needs
no block (``supplied`` 0), which is decoded at once and only stored at its turn. A turn for which no
KV will ever come (a cancelled request whose prefill worker died) is skipped on the router's word
(SKIP); after that the mirror may name blocks the worker lacks, and such a request's KV is recomputed
here from its prompt (counted in ``stats["recomputed"]``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from .prefix import PrefixCache

KV = tuple[list[np.ndarray], list[np.ndarray]]  # per layer (P, K, H) keys and values


class DecodePrefix:
    def __init__(self, block_size: int, capacity: int) -> None:
        self.cache = PrefixCache(block_size, capacity)
        self.next = 0
        self.pending: dict[int, Callable[[], None]] = {}
        self.skipped: set[int] = set()
        self.stats = {"supplied_tokens": 0, "recomputed": 0}

    def arrive(self, seq: int, turn: Callable[[], None]) -> None:
        """Run ``turn`` once every earlier turn has run (see `turns`)."""
        self.pending[seq] = turn

    def skip(self, seq: int) -> None:
        self.skipped.add(seq)

    def turns(self) -> Iterator[Callable[[], None]]:
        """The turns that can run now, in order."""
        while True:
            if self.next in self.skipped:
                self.skipped.discard(self.next)
                self.next += 1
                continue
            turn = self.pending.pop(self.next, None)
            if turn is None:
                return
            self.next += 1
            yield turn

    def apply(self, prompt: np.ndarray, supplied: int, tail: KV, recompute: Callable[[], KV]) -> tuple[KV, bool]:
        """A request's turn: its whole KV — the first ``supplied`` tokens from this cache's blocks, then
        ``tail`` — with its new full blocks stored; ``recompute()`` gives it when a block is missing (the
        second value then True)."""
        blocks = self.cache.match(prompt)
        n = supplied // self.cache.block_size
        try:
            if len(blocks) >= n:
                k = [np.concatenate([*(b.k[layer] for b in blocks[:n]), t]) for layer, t in enumerate(tail[0])]
                v = [np.concatenate([*(b.v[layer] for b in blocks[:n]), t]) for layer, t in enumerate(tail[1])]
                again = False
            else:
                (k, v), again = recompute(), True
                self.stats["recomputed"] += 1
            self.stats["supplied_tokens"] += 0 if again else supplied
            self.cache.store(prompt, k, v)
        finally:
            self.cache.unpin(blocks)
        return (k, v), again
