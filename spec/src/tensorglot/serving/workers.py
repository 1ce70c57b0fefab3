"""The worker ranks of disaggregated serving, over any `Transport`: ranks 1..P prefill, ranks
P + 1..P + M decode (rank 0 routes: `tensorglot.serving.router`).

A prefill worker sends each request's KV to the decode rank its REQUEST names. A decode worker keeps
the first KV of a request and drops a late duplicate (a request recomputed after its prefill worker
was declared dead keeps its decode worker).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import transport as tr
from .engine import Prefilled, Sequence, prefill
from .handoff import KV, DecodePrefix
from .model import Model
from .online import Job, _Engine, _offer
from .prefix import PrefixCache, PromptPrefill

logger = logging.getLogger("tensorglot.serving")


@dataclass(frozen=True)
class Fault:
    """Fault injection for tests: prefill worker ``rank`` dies (``die``), stops answering (``hang``: its
    transport's threads still run) or is frozen whole (``stop``: SIGSTOP) when its request number
    ``after`` (from 0; -1 with ``stop``: at start-up, before its model loads) arrives, or is frozen
    while it sends that request's KV (``stop-sending``: the header and one array sent). The decode
    worker dies (``die``) or is frozen (``stop``) once it has finished ``after`` + 1 requests."""

    rank: int
    mode: str = "die"
    after: int = 0


@dataclass
class Options:
    prefill_workers: int = 1
    decode_workers: int = 1
    prefix_blocks: int = 0  # each prefill worker's prefix cache, in blocks of block_size (0: none)
    timeout_s: float = 30.0
    max_inflight: int = 2
    max_batch: int = 16
    block_size: int = 16
    threads: int = 1
    transport: str | None = None  # a name registered through tensorglot_register_transports
    address: str | None = None  # join these ranks (torchrun's "env://") instead of spawning them
    faults: list[Fault] = field(default_factory=list)


def beat_s(opts: Options) -> float:
    """A worker's heartbeat period: a few beats per timeout, so one late beat is no death."""
    return min(1.0, opts.timeout_s / 4)


def heartbeat(t: tr.Transport, every_s: float) -> None:
    """Send BEAT to the router every ``every_s`` seconds from a daemon thread, for as long as this
    process runs: a frozen process (SIGSTOP) stops beating, a busy one does not."""

    def beat() -> None:
        while True:
            t.send(0, tr.header(tr.BEAT))
            time.sleep(every_s)

    threading.Thread(target=beat, daemon=True, name="heartbeat").start()


def prefill_worker(t: tr.Transport, opts: Options, model: Model, fault: Fault | None) -> None:
    heartbeat(t, beat_s(opts))
    if fault is not None and fault.after < 0 and fault.mode == "stop":  # frozen during start-up
        os.kill(os.getpid(), signal.SIGSTOP)
    be, params, config = model.load()
    prefill(be, params, config, np.zeros(2, dtype=np.int64))  # warm-up: first calls are not timed
    prefix = PrefixCache(opts.block_size, opts.prefix_blocks) if opts.prefix_blocks else None
    t.send(0, tr.header(tr.READY))
    t.listen([0])
    handled = 0
    while True:
        msg = t.recv(1.0)
        if msg is None:
            continue
        if msg.header is None or msg.header[0] == tr.STOP:
            break
        rid, P, max_new, decode = msg.header[1:5]
        seq, supplied = msg.header[6:8]  # the KV of the first `supplied` tokens is the decode worker's
        if fault is not None and handled >= fault.after and fault.mode != "stop-sending":
            if fault.mode == "die":
                os._exit(3)
            if fault.mode == "stop":  # frozen, its transport's threads too (the launcher kills it)
                os.kill(os.getpid(), signal.SIGSTOP)
            time.sleep(3600)  # hang: alive, answering nothing (the launcher ends it)
        prompt = msg.payload[0]
        pre, cached = _prefill(be, params, config, prompt, prefix)
        arrays = pre.arrays
        tail = [a[supplied:] for a in arrays]
        sampled = msg.payload[1:]  # a server's request: its sampling, and the logits to sample from
        head = tr.header(
            tr.KV, rid, P, max_new, pre.first_token, tr.DTYPES.index(str(arrays[0].dtype)),
            config.n_layers, config.n_kv_heads, config.head_dim, tr.now_us(), tr.digest(arrays),
            int(pre.seconds * 1e6), t.rank, len(sampled[0]) if sampled else 0, config.vocab_size, cached,
            supplied, seq,
        )  # fmt: skip
        if fault is not None and handled >= fault.after and fault.mode == "stop-sending":
            t.send(decode, head, tail[:1])  # the header and the first layer's keys, then frozen mid-KV
            t.drain(opts.timeout_s)
            os.kill(os.getpid(), signal.SIGSTOP)
        logits = [pre.logits] if sampled and pre.logits is not None else []
        t.send(decode, head, [*tail, prompt, *sampled, *logits])  # layer by layer, after the header
        handled += 1
        for dst in t.failures():
            logger.warning("prefill rank %d: a send to rank %d failed or timed out", t.rank, dst)
    t.drain(opts.timeout_s)


def _prefill(
    be: Any, params: Any, config: Any, prompt: np.ndarray, prefix: PrefixCache | None
) -> tuple[Prefilled, int]:
    """The prompt's first token and KV, computed past the longest prefix ``prefix`` holds (whose full
    blocks it then keeps); also how many prompt tokens came from the cache."""
    if prefix is None:
        return prefill(be, params, config, prompt), 0
    blocks = prefix.match(prompt)
    try:
        state = PromptPrefill(be, params, config, prompt, blocks)
        state.run()
        pre = state.finish()
    finally:
        prefix.unpin(blocks)
    prefix.store(prompt, pre.k, pre.v)
    return pre, state.cached


def _us(t: float) -> int:
    """Wall-clock seconds as the µs the wire carries, rounded as each token's time is (`finish`), so the
    header's first and last times are the token times' ends and the ITL gaps add up to the TPOT exactly."""
    return round(t * 1e6)


def _done_header(seq: Sequence) -> np.ndarray:
    i = seq.info
    return tr.header(
        tr.DONE, seq.rid, len(seq.tokens), _us(seq.t_first), _us(seq.t_last),
        i["kv_bytes"], i["transfer_us"], i["prefill_us"], i["worker"], int(i["digest_ok"]), i["digest"],
        i.get("cached", 0), i.get("supplied", 0), i.get("saved", 0),
    )  # fmt: skip


def _sampled(seq: Sequence, sampling: np.ndarray, logits: np.ndarray) -> Sequence:
    """A server's request: its first token drawn from ``logits`` by its own sampler, which the decode
    steps go on with; the tokens it takes are kept in ``info["unsent"]`` until streamed (TOKEN)."""
    params, choice = tr.unpack_sampling(sampling)
    unsent: list[int] = []

    def take(token: int) -> bool:
        unsent.append(token)
        return True

    job = Job(np.zeros(0, np.int64), params, take, lambda reason, error: None, choice)
    first = job.sampler(logits)
    seq.max_new = 1 if _offer(job, first, 1) is not None else params.max_tokens
    seq.tokens, seq.info["job"], seq.info["unsent"] = [first], job, unsent
    return seq


def decode_worker(t: tr.Transport, opts: Options, model: Model, fault: Fault | None = None) -> None:
    heartbeat(t, beat_s(opts))
    be, params, config = model.load()
    engine = _Engine(be, params, config, max_batch=opts.max_batch, block_size=opts.block_size)
    engine.warm_up()
    own = DecodePrefix(opts.block_size, opts.prefix_blocks) if opts.prefix_blocks else None
    t.send(0, tr.header(tr.READY))
    t.listen(list(range(opts.prefill_workers + 1)))  # the router and the prefill workers
    seen: set[int] = set()  # requests whose KV (or REQUEST) was taken: a later one is a duplicate
    cancelled: set[int] = set()
    waiting: deque[tuple[Sequence, list[np.ndarray], list[np.ndarray]]] = deque()
    stopping = False

    finished = 0

    def finish(seq: Sequence) -> None:
        nonlocal finished
        seq.t_last = seq.t_last or time.time()
        at_us = np.round(np.asarray(seq.times) * 1e6).astype(np.int64)  # each token's time: its ITL
        t.send(0, _done_header(seq), [np.asarray(seq.tokens, dtype=np.int64), at_us])
        finished += 1
        if fault is not None and finished > fault.after:  # what was sent arrives first
            t.drain(opts.timeout_s)
            if fault.mode == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
            os._exit(3)

    def enqueue(seq: Sequence, kv: KV, dig: int) -> None:
        got = tr.digest([a for pair in zip(*kv) for a in pair])
        seq.info |= {"digest_ok": got == dig, "digest": got}  # the bytes prefill computed, bit for bit
        if seq.rid not in cancelled:
            waiting.append((seq, *kv))

    def on_kv(msg: tr.Message) -> None:
        h, L = msg.header, config.n_layers
        assert h is not None
        rid, max_new, first, sent_us, dig, prefill_us, worker = (h[i] for i in (1, 3, 4, 9, 10, 11, 12))
        supplied, order = h[16], h[17]
        t.send(0, tr.header(tr.RECEIVED, rid, msg.src))
        arrays, prompt = msg.payload[: 2 * L], msg.payload[2 * L]  # then a server's sampling and logits
        received = sum(a.nbytes for a in arrays)
        info = {
            "kv_bytes": received,
            "transfer_us": int(msg.t_recv * 1e6) - sent_us,
            "prefill_us": prefill_us,
            "worker": worker,
            "cached": h[15],
            "supplied": supplied,
            # the bytes the decode worker's own blocks gave: the whole KV's share of `supplied` tokens
            "saved": supplied * (received // max(1, len(prompt) - supplied)),
        }
        seq = Sequence(rid, h[2], max_new, [first], msg.t_recv, info)
        if h[13]:
            seq = _sampled(seq, msg.payload[-2], msg.payload[-1])
        tail = (arrays[0::2], arrays[1::2])
        if own is None or order < 0:
            enqueue(seq, tail, dig)
            return
        if supplied == 0:  # needs no block: decoded at once, stored at its turn
            enqueue(seq, tail, dig)

        def turn() -> None:
            assert own is not None
            kv, again = own.apply(prompt, supplied, tail, lambda: _whole(be, params, config, prompt))
            if supplied:
                seq.info["supplied"], seq.info["saved"] = (0, 0) if again else (supplied, seq.info["saved"])
                enqueue(seq, kv, dig)

        own.arrive(order, turn)

    def on_request(msg: tr.Message) -> None:  # no prefill worker is left: prefill here
        h = msg.header
        assert h is not None

        def turn() -> None:
            prompt = msg.payload[0]
            pre = prefill(be, params, config, prompt)
            if own is not None:
                own.apply(prompt, 0, (pre.k, pre.v), lambda: (pre.k, pre.v))
            info = {"kv_bytes": 0, "transfer_us": 0, "prefill_us": int(pre.seconds * 1e6), "worker": t.rank}
            seq = Sequence(h[1], h[2], h[3], [pre.first_token], time.time(), info)
            if len(msg.payload) > 1 and pre.logits is not None:
                seq = _sampled(seq, msg.payload[1], pre.logits)
            enqueue(seq, (pre.k, pre.v), tr.digest(pre.arrays))

        if own is None or h[6] < 0:
            turn()
        else:
            own.arrive(h[6], turn)

    while True:
        idle = not engine.active and not waiting
        while (msg := t.recv(0.002 if idle else 0.0)) is not None:
            idle = False
            if msg.header is None:
                logger.warning("decode: rank %d is gone (%s); the router recomputes its requests", msg.src, msg.error)
                continue
            kind, rid = msg.header[0], msg.header[1]
            if kind in (tr.KV, tr.REQUEST) and rid in seen:
                if kind == tr.KV:
                    t.send(0, tr.header(tr.RECEIVED, rid, msg.src))
                continue  # a late duplicate of a recomputed request
            if kind in (tr.KV, tr.REQUEST):
                seen.add(rid)
                (on_kv if kind == tr.KV else on_request)(msg)
            elif kind == tr.CANCEL:  # a server's client left, or a stop string ended it
                cancelled.add(rid)
                waiting = deque(w for w in waiting if w[0].rid != rid)
                if rid in engine.active:
                    engine.drop(rid)
            elif kind == tr.SKIP and own is not None:
                own.skip(msg.header[2])
            elif kind == tr.DEAD:
                t.drop(msg.header[2])
            elif kind == tr.STOP:
                stopping = True
        for turn in own.turns() if own is not None else ():
            turn()
        while waiting and engine.can_admit(waiting[0][0].prompt_len, waiting[0][0].max_new):
            seq, k, v = waiting.popleft()
            for done in engine.admit(seq, k, v):
                finish(done)
        if engine.active:
            for done in engine.step():
                finish(done)
        for seq in engine.active.values():  # a server's tokens stream back as they come
            if seq.info.get("unsent"):
                t.send(0, tr.header(tr.TOKEN, seq.rid, len(seq.info["unsent"])), [np.asarray(seq.info["unsent"])])
                seq.info["unsent"].clear()
        if not engine.active and stopping and not waiting:
            break
    t.drain(opts.timeout_s)


def _whole(be: Any, params: Any, config: Any, prompt: np.ndarray) -> KV:
    """A prompt's whole KV computed here (a decode worker whose blocks are missing)."""
    pre = prefill(be, params, config, prompt)
    return pre.k, pre.v
