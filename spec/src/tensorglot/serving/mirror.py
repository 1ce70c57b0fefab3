"""The router's mirror of every worker's prefix cache, and the (prefill, decode) pair a request goes to.

Each prefill worker keeps a `PrefixCache` of the blocks it computed (it prefills only past its longest
stored prefix) and each decode worker one of the blocks it has held (it is sent only the KV past its
longest stored prefix). The router keeps a key-only `PrefixCache` per worker and applies to it, when it
routes a request, the very calls the worker makes when it handles that request (`match`, `store`,
`unpin`): a prefill worker handles its requests in the order sent, and a decode worker applies its
prefix-cache operations in the order the router numbered them (``seq``, `tensorglot.serving.handoff`),
so the mirror and the cache hold the same blocks in the same least-recently-used order.

**Origins.** A block's KV bits depend a little on the prompt it was computed in (a softmax over more
keys sums in another order), so a decode worker's block and a prefill worker's block with the same key
may differ in the last bit. The prefill worker computes the rest of the prompt against its own blocks,
so the decode worker may supply only blocks with the same bits: each mirrored block records its
``origin`` (the request whose prefill computed it), and the decode worker supplies the longest prefix
whose origins equal the prefill worker's. The digest of the assembled KV then equals prefill's.

**The pair rule.** A request goes to the pair (prefill worker with room, live decode worker) with the
most blocks saved — computed-again blocks saved at the prefill worker plus transferred blocks saved at
the decode worker — then the prefill worker with the fewest in flight, then the decode worker with the
least outstanding work, then the lowest ranks.
"""

from __future__ import annotations

import numpy as np

from .prefix import PrefixCache, block_keys


class Mirrors:
    """Key-only copies of the prefill workers' and the decode workers' prefix caches."""

    def __init__(self, prefill: list[int], decode: list[int], block_size: int, capacity: int) -> None:
        self.block_size = block_size
        self.prefill = {w: PrefixCache(block_size, capacity) for w in prefill}
        self.decode = {d: PrefixCache(block_size, capacity) for d in decode}
        self.next_seq = dict.fromkeys(decode, 0)

    def savings(self, prompt: np.ndarray, w: int | None, d: int) -> tuple[int, int]:
        """Blocks of ``prompt`` prefill worker ``w`` need not compute and decode worker ``d`` need not be
        sent (``w`` None: the decode worker prefills, and is sent nothing)."""
        at_w = self.prefill[w].peek(prompt) if w in self.prefill else []
        at_d = self.decode[d].peek(prompt)
        same = 0
        while same < min(len(at_w), len(at_d)) and at_w[same].origin == at_d[same].origin:
            same += 1
        return len(at_w), same

    def prefill_routed(self, rid: int, prompt: np.ndarray, w: int | None) -> list[int]:
        """Apply worker ``w``'s prefill of ``prompt`` (`workers._prefill`: match, unpin, store); return the
        origin of each full block of the KV it sends (its stored blocks' where it matched, else ``rid``)."""
        n = len(block_keys(prompt, self.block_size))
        if w not in self.prefill:
            return [rid] * n
        cache = self.prefill[w]
        blocks = cache.match(prompt)
        origins = [b.origin for b in blocks] + [rid] * (n - len(blocks))
        cache.unpin(blocks)
        cache.store(prompt, None, None, origins)
        return origins

    def decode_routed(self, prompt: np.ndarray, d: int, origins: list[int]) -> int:
        """Apply decode worker ``d``'s turn for ``prompt`` (`handoff.DecodePrefix.apply`: match, store,
        unpin); return the turn's number."""
        cache = self.decode[d]
        blocks = cache.match(prompt)
        cache.store(prompt, None, None, origins)
        cache.unpin(blocks)
        seq = self.next_seq[d]
        self.next_seq[d] += 1
        return seq

    def blocks(self, rank: int) -> set[bytes]:
        """The keys worker ``rank``'s cache holds (none once it is gone)."""
        cache = self.prefill.get(rank) or self.decode.get(rank)
        return set(cache.blocks) if cache is not None else set()

    def forget(self, rank: int) -> None:
        """A dead worker's blocks vanish."""
        self.prefill.pop(rank, None)
        self.decode.pop(rank, None)
        self.next_seq.pop(rank, None)
