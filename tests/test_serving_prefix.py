"""Decode-side prefix blocks: a decode worker keeps the KV blocks of the prompts it has held, the router
mirrors them and routes to the (prefill, decode) pair that saves the most, and only the KV past the
decode worker's blocks travels — with the digest over the whole assembled KV and `generate`'s tokens.

The router and the decode worker's ordering run here without processes (a recording transport); one
disaggregated run over the installed transport checks the counts end to end.
"""

from __future__ import annotations

import numpy as np
import pytest

import tensorglot
from tensorglot.registry import registry
from tensorglot.serving import Model, Options, Request, serve
from tensorglot.serving import transport as tr
from tensorglot.serving.handoff import DecodePrefix
from tensorglot.serving.router import Router

CONFIG = tensorglot.TransformerConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=48
)
TOKEN_BYTES = 2 * CONFIG.n_layers * CONFIG.n_kv_heads * CONFIG.head_dim * 4  # k and v of one token, float32


class Recorder:
    """A transport that records what the router sends and delivers nothing."""

    rank, world_size = 0, 0

    def __init__(self) -> None:
        self.sent: list[tuple[int, list[int]]] = []

    def listen(self, sources):
        pass

    def send(self, dst, header, arrays=()):
        self.sent.append((dst, header.tolist()))

    def recv(self, timeout):
        return None

    def drop(self, src):
        pass

    def failures(self):
        return set()


def _requests(r: Router, t: Recorder) -> list[tuple[int, int, int, int, int]]:
    """(rid, prefill rank or the decode rank, decode rank, seq, supplied) of each REQUEST sent, then forget them."""
    out = [(h[1], dst, h[4], h[6], h[7]) for dst, h in t.sent if h[0] == tr.REQUEST]
    t.sent.clear()
    for rids in r.inflight.values():
        rids.clear()  # as if every RECEIVED had come back
    return out


def test_the_router_sends_the_tail_past_the_decode_workers_blocks_and_forgets_a_dead_ones():
    t = Recorder()
    r = Router(t, Options(prefill_workers=1, decode_workers=2, prefix_blocks=8, block_size=4), CONFIG)
    shared = np.arange(8) + 10  # two blocks of 4
    r.add(Request(0, np.r_[shared, 1], 3))
    r.add(Request(1, np.arange(5), 3))
    r.dispatch()
    assert _requests(r, t) == [(0, 1, 2, 0, 0), (1, 1, 3, 0, 0)]  # nothing held: by load
    r.add(Request(2, np.r_[shared, 2, 3], 3))
    r.dispatch()
    # rank 1 holds both blocks (it computed them) and rank 2 holds them with the same bits: 8 tokens stay
    assert _requests(r, t) == [(2, 1, 2, 1, 8)]
    assert r.mirrors.blocks(2) < r.mirrors.blocks(1)  # rank 1 holds request 1's block too
    assert len(r.mirrors.blocks(2)) == 2 and len(r.mirrors.blocks(3)) == 1
    r.decode_lost(2, "died")
    assert r.mirrors.blocks(2) == set() and 2 not in r.mirrors.next_seq
    r.dispatch()  # requests 0 and 2 again, now on rank 3, which holds none of their blocks
    assert _requests(r, t) == [(0, 1, 3, 1, 0), (2, 1, 3, 2, 8)]  # 2 follows 0, whose blocks 3 now holds


def test_blocks_of_other_bits_are_not_supplied():
    """A prefill worker that computed a prefix itself may differ in the last bit from the decode
    worker's copy: that copy is not used (the digest of the assembled KV would not match)."""
    t = Recorder()
    r = Router(t, Options(prefill_workers=2, decode_workers=1, prefix_blocks=8, block_size=4), CONFIG)
    shared = np.arange(8) + 10
    r.add(Request(0, np.r_[shared, 1], 3))
    r.dispatch()
    t.sent.clear()  # request 0 stays in flight on rank 1
    r.add(Request(1, np.r_[shared, 2], 3))
    r.add(Request(2, np.r_[shared, 3], 3))
    r.dispatch()
    # 1: rank 1 (two blocks saved twice) still has room; 2: rank 1 is full, rank 2 computes the prefix
    # itself, so rank 3's blocks (rank 1's bits) are not supplied
    assert [(h[1], dst, h[7]) for dst, h in t.sent if h[0] == tr.REQUEST] == [(1, 1, 8), (2, 2, 0)]


def test_turns_run_in_the_routers_order_and_a_skipped_turn_lets_the_next_run():
    own, ran = DecodePrefix(block_size=4, capacity=4), []
    own.arrive(1, lambda: ran.append(1))
    assert list(own.turns()) == []  # turn 0 has not arrived
    own.arrive(0, lambda: ran.append(0))
    for turn in own.turns():
        turn()
    own.arrive(3, lambda: ran.append(3))
    own.skip(2)
    for turn in own.turns():
        turn()
    assert ran == [0, 1, 3] and own.next == 4


def test_assembling_uses_the_blocks_and_recomputes_when_one_is_missing():
    own = DecodePrefix(block_size=2, capacity=8)
    prompt = np.arange(5)
    whole = ([np.arange(5.0)[:, None, None] * (layer + 1) for layer in range(2)], [np.arange(5.0)[:, None, None]] * 2)
    kv, again = own.apply(prompt, 0, whole, recompute=lambda: pytest.fail("nothing is missing"))
    assert not again and all(np.array_equal(a, b) for a, b in zip(kv[0], whole[0]))
    tail = ([a[4:] for a in whole[0]], [a[4:] for a in whole[1]])
    kv, again = own.apply(prompt, 4, tail, recompute=lambda: pytest.fail("nothing is missing"))
    assert not again and all(np.array_equal(a, b) for a, b in zip(kv[0] + kv[1], whole[0] + whole[1]))
    other = np.r_[9, prompt[1:]]  # no block of it is held
    kv, again = own.apply(other, 4, tail, recompute=lambda: whole)
    assert again and own.stats == {"supplied_tokens": 4, "recomputed": 1}


def _reference(prompt: np.ndarray, n: int) -> list[int]:
    be = tensorglot.get_backend("numpy")
    out = be.layers.generate(tensorglot.init_params(CONFIG, 0), CONFIG, prompt[None], max_new_tokens=n)
    return be.to_numpy(out)[0, len(prompt) :].tolist()


@pytest.mark.skipif(not registry().transports(), reason="needs a serving transport (tensorglot-torch provides one)")
@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_shared_prefixes_are_sent_once_to_each_decode_worker_and_tokens_equal_generate():
    rng = np.random.default_rng(3)
    shared = {g: rng.integers(0, CONFIG.vocab_size, size=32) for g in "ab"}  # two full blocks of 16 each
    reqs = [
        Request(i, np.concatenate([shared[g], rng.integers(0, CONFIG.vocab_size, size=2 + i % 3)]), 3)
        for i, g in enumerate("ababab")
    ]
    out = serve(reqs, Model("numpy", CONFIG.to_dict(), seed=0), prefill_workers=1, decode_workers=2,
                prefix_blocks=64, timeout_s=60)  # fmt: skip
    recs = out["requests"]
    for req, rec in zip(reqs, recs):
        assert rec["tokens"] == _reference(req.prompt, req.max_new_tokens), req.rid
        assert rec["kv_digest_ok"]  # the assembled KV is, bit for bit, what prefill computed
    # a and b go to ranks 2 and 3 by load; each later one to the decode worker that holds its prefix
    assert [rec["decode_worker"] for rec in recs] == [2, 3, 2, 3, 2, 3]
    assert [rec["prefill_cached_tokens"] for rec in recs] == [0, 0, 32, 32, 32, 32]
    assert [rec["decode_cached_tokens"] for rec in recs] == [0, 0, 32, 32, 32, 32]
    assert [rec["kv_bytes"] for rec in recs] == [(len(q.prompt) - (32 if q.rid > 1 else 0)) * TOKEN_BYTES for q in reqs]
    assert [rec["kv_bytes_saved"] for rec in recs] == [0, 0] + [32 * TOKEN_BYTES] * 4
    whole = sum(len(q.prompt) for q in reqs) * TOKEN_BYTES
    assert sum(rec["kv_bytes"] for rec in recs) == whole - 4 * 32 * TOKEN_BYTES  # 128 of 210 tokens' KV stayed


@pytest.mark.skipif(not registry().transports(), reason="needs a serving transport (tensorglot-torch provides one)")
@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_a_dead_prefill_worker_costs_its_decode_turns_nothing_and_tokens_equal_generate():
    """Rank 1 dies at its second request; that request keeps its decode worker and its turn there, so
    the requests numbered after it (waiting for it in order) run once rank 2 has recomputed it."""
    from tensorglot.serving import Fault

    rng = np.random.default_rng(4)
    shared = rng.integers(0, CONFIG.vocab_size, size=16)
    reqs = [Request(i, np.r_[shared, rng.integers(0, CONFIG.vocab_size, size=1 + i)], 4) for i in range(6)]
    out = serve(reqs, Model("numpy", CONFIG.to_dict(), seed=0), prefill_workers=2, prefix_blocks=64, timeout_s=3,
                faults=[Fault(1, "die", after=1)])  # fmt: skip
    recs = out["requests"]
    for req, rec in zip(reqs, recs):
        assert rec["error"] is None and rec["tokens"] == _reference(req.prompt, req.max_new_tokens), req.rid
    assert out["summary"]["recomputed"] >= 1 and any("prefill worker rank 1" in e for e in out["events"])
