"""The ranks of disaggregated serving, over any `Transport`: rank 0 routes, ranks 1..P prefill, rank
P + 1 decodes.

Routing: a request goes to the live prefill worker with the fewest in flight (at most
``max_inflight`` each), or to the decode worker itself when no prefill worker is left.

Faults: the router expects the decode worker's RECEIVED for each request it handed out; a prefill
worker that makes no progress for ``timeout_s`` (dead or hung), or that a send cannot reach, is
declared dead — logged, the decode worker told to stop listening to it — and its requests are
recomputed elsewhere with the same tokens. The decode worker keeps the first KV of a request and drops
a late duplicate.
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

from ..params import TransformerConfig
from . import transport as tr
from .admission import Arrivals, Request
from .engine import DecodeEngine, Sequence, prefill
from .metrics import rejected_record, request_record
from .model import Model

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
    timeout_s: float = 30.0
    max_inflight: int = 2
    max_batch: int = 16
    block_size: int = 16
    threads: int = 1
    transport: str | None = None  # a name registered through tensorglot_register_transports
    faults: list[Fault] = field(default_factory=list)


def beat_s(opts: Options) -> float:
    """A worker's heartbeat period: a few beats per timeout, so one late beat is no death."""
    return min(1.0, opts.timeout_s / 4)


def route(live: list[int], inflight: dict[int, list[int]], max_inflight: int) -> int | None:
    """The least-loaded live prefill worker with room, or None when all are full."""
    ready = [w for w in live if len(inflight[w]) < max_inflight]
    return min(ready, key=lambda w: len(inflight[w])) if ready else None


def heartbeat(t: tr.Transport, every_s: float) -> None:
    """Send BEAT to the router every ``every_s`` seconds from a daemon thread, for as long as this
    process runs: a frozen process (SIGSTOP) stops beating, a busy one does not."""

    def beat() -> None:
        while True:
            t.send(0, tr.header(tr.BEAT))
            time.sleep(every_s)

    threading.Thread(target=beat, daemon=True, name="heartbeat").start()


def router(t: tr.Transport, opts: Options, requests: list[Request], config: TransformerConfig, out: Any) -> None:
    decode = opts.prefill_workers + 1
    workers = list(range(1, decode + 1))
    t.listen(workers)  # READY, BEAT and, from the decode worker, RECEIVED and DONE
    live = list(range(1, decode))
    inflight: dict[int, list[int]] = {w: [] for w in live}
    progress = dict.fromkeys(live, 0.0)
    seen = dict.fromkeys(workers, time.monotonic())  # when each worker was last heard from
    ready: set[int] = set()
    by_id = {r.rid: r for r in requests}
    waiting = deque[Request]()
    recomputed: set[int] = set()
    results: dict[int, dict[str, Any]] = {}
    events: list[str] = []
    decode_error: str | None = None

    def declare_dead(w: int, why: str) -> None:
        live.remove(w)
        lost = inflight.pop(w)
        where = f"prefill rank(s) {live}" if live else f"the decode rank {decode}"
        events.append(f"prefill worker rank {w} {why}; recomputing request(s) {lost} on {where}")
        t.send(decode, tr.header(tr.DEAD, -1, w))
        t.drop(w)
        for rid in reversed(lost):
            waiting.appendleft(by_id[rid])
            recomputed.add(rid)

    def receive(timeout: float) -> None:
        """One message, if any: who is alive, ready, done; a worker silent past the timeout is dead."""
        nonlocal decode_error
        msg = t.recv(timeout)
        if msg is not None and msg.header is None:
            if msg.src == decode:
                decode_error = f"the decode worker (rank {decode}) failed: {msg.error}"
            elif msg.src in live:
                declare_dead(msg.src, f"could not be reached ({msg.error})")
        elif msg is not None and msg.header is not None:
            seen[msg.src] = time.monotonic()
            head = msg.header
            kind, rid = head[0], head[1]
            if kind == tr.READY:
                ready.add(msg.src)
            elif kind == tr.RECEIVED:
                w = head[2]
                if w in inflight and rid in inflight[w]:
                    inflight[w].remove(rid)
                if w in progress:
                    progress[w] = time.monotonic()
            elif kind == tr.DONE:
                done(rid, head, msg.payload[0])
        now = time.monotonic()
        if decode_error is None and now - seen[decode] > opts.timeout_s:
            decode_error = f"the decode worker (rank {decode}) sent nothing for {opts.timeout_s:g} s"
        for w in list(live):
            if now - seen[w] > opts.timeout_s:
                declare_dead(w, f"sent nothing for {opts.timeout_s:.1f} s (died or frozen)")
            elif inflight[w] and now - progress[w] > opts.timeout_s:
                declare_dead(w, f"delivered nothing for {opts.timeout_s:.1f} s (died or stopped answering)")
        for dst in t.failures():
            if dst in live:
                declare_dead(dst, "could not be reached (its connection failed)")

    def done(rid: int, head: list[int], tokens: np.ndarray) -> None:
        first_us, last_us, kv_bytes, transfer_us, prefill_us, worker, ok, dig = head[3:11]
        results[rid] = request_record(
            by_id[rid], tokens.tolist(), t_first=first_us / 1e6, t_last=last_us / 1e6, kv_bytes=kv_bytes,
            transfer_s=transfer_us / 1e6, prefill_s=prefill_us / 1e6, worker=worker,
            recomputed=rid in recomputed, kv_digest_ok=bool(ok),
        )  # fmt: skip
        results[rid]["kv_digest"] = dig
        out.put(("progress", len(results)))

    # Every worker has loaded its model (or is dead): the clock starts now.
    while decode_error is None and not ready >= {*live, decode}:
        receive(0.01)
    out.put(("started", None))
    arrivals = Arrivals(requests)
    while len(results) < len(requests) and decode_error is None:
        for error in arrivals.admit(config, waiting, results):
            events.append(f"rejected: {error}")
            out.put(("progress", len(results)))
        while waiting:
            target = route(live, inflight, opts.max_inflight) if live else decode
            if target is None:
                break
            req = waiting.popleft()
            prompt = np.asarray(req.prompt, dtype=np.int64)
            t.send(target, tr.header(tr.REQUEST, req.rid, len(prompt), req.max_new_tokens), [prompt])
            if target != decode:
                if not inflight[target]:
                    progress[target] = time.monotonic()
                inflight[target].append(req.rid)
        receive(arrivals.wait_s(0.002))
    wall = time.time() - arrivals.t0
    if decode_error is not None:  # what completed is kept; the rest fail with the reason
        unfinished = [r.rid for r in requests if r.rid not in results]
        events.append(f"{decode_error}; request(s) {unfinished} failed")
        for r in requests:
            if r.rid not in results:
                results[r.rid] = rejected_record(r, f"request {r.rid}: {decode_error}")
    for dst in [*live, *([decode] if decode_error is None else [])]:
        t.send(dst, tr.header(tr.STOP))
    t.drain(opts.timeout_s)
    out.put(("result", {"requests": [results[r.rid] for r in requests], "events": events, "wall_s": wall}))


def prefill_worker(t: tr.Transport, opts: Options, model: Model, fault: Fault | None) -> None:
    decode = opts.prefill_workers + 1
    heartbeat(t, beat_s(opts))
    if fault is not None and fault.after < 0 and fault.mode == "stop":  # frozen during start-up
        os.kill(os.getpid(), signal.SIGSTOP)
    be, params, config = model.load()
    prefill(be, params, config, np.zeros(2, dtype=np.int64))  # warm-up: first calls are not timed
    t.send(0, tr.header(tr.READY))
    t.listen([0])
    handled = 0
    while True:
        msg = t.recv(1.0)
        if msg is None:
            continue
        if msg.header is None or msg.header[0] == tr.STOP:
            break
        rid, P, max_new = msg.header[1:4]
        if fault is not None and handled >= fault.after and fault.mode != "stop-sending":
            if fault.mode == "die":
                os._exit(3)
            if fault.mode == "stop":  # frozen, its transport's threads too (the launcher kills it)
                os.kill(os.getpid(), signal.SIGSTOP)
            time.sleep(3600)  # hang: alive, answering nothing (the launcher ends it)
        pre = prefill(be, params, config, msg.payload[0])
        arrays = pre.arrays
        head = tr.header(
            tr.KV, rid, P, max_new, pre.first_token, tr.DTYPES.index(str(arrays[0].dtype)),
            config.n_layers, config.n_kv_heads, config.head_dim, tr.now_us(), tr.digest(arrays),
            int(pre.seconds * 1e6), t.rank,
        )  # fmt: skip
        if fault is not None and handled >= fault.after and fault.mode == "stop-sending":
            t.send(decode, head, arrays[:1])  # the header and the first layer's keys, then frozen mid-KV
            t.drain(opts.timeout_s)
            os.kill(os.getpid(), signal.SIGSTOP)
        t.send(decode, head, arrays)  # layer by layer, after the header
        handled += 1
        for dst in t.failures():
            logger.warning("prefill rank %d: a send to rank %d failed or timed out", t.rank, dst)
    t.drain(opts.timeout_s)


def _done_header(seq: Sequence) -> np.ndarray:
    i = seq.info
    return tr.header(
        tr.DONE, seq.rid, len(seq.tokens), int(seq.t_first * 1e6), int(seq.t_last * 1e6),
        i["kv_bytes"], i["transfer_us"], i["prefill_us"], i["worker"], int(i["digest_ok"]), i["digest"],
    )  # fmt: skip


def decode_worker(t: tr.Transport, opts: Options, model: Model, fault: Fault | None = None) -> None:
    heartbeat(t, beat_s(opts))
    be, params, config = model.load()
    engine = DecodeEngine(be, params, config, max_batch=opts.max_batch, block_size=opts.block_size)
    engine.warm_up()
    t.send(0, tr.header(tr.READY))
    t.listen(list(range(t.rank)))
    seen: set[int] = set()
    waiting: deque[tuple[Sequence, list[np.ndarray], list[np.ndarray]]] = deque()
    stopping = False

    finished = 0

    def finish(seq: Sequence) -> None:
        nonlocal finished
        t.send(0, _done_header(seq), [np.asarray(seq.tokens, dtype=np.int64)])
        finished += 1
        if fault is not None and finished > fault.after:  # what was sent arrives first
            t.drain(opts.timeout_s)
            if fault.mode == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
            os._exit(3)

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
            if kind == tr.KV:
                max_new, first, sent_us, dig, prefill_us, worker = (msg.header[i] for i in (3, 4, 9, 10, 11, 12))
                t.send(0, tr.header(tr.RECEIVED, rid, msg.src))
                seen.add(rid)
                arrays, got = msg.payload, tr.digest(msg.payload)
                info = {
                    "kv_bytes": sum(a.nbytes for a in arrays),
                    "transfer_us": int(msg.t_recv * 1e6) - sent_us,
                    "prefill_us": prefill_us,
                    "worker": worker,
                    "digest_ok": got == dig,  # the bytes prefill computed, bit for bit
                    "digest": got,
                }
                seq = Sequence(rid, msg.header[2], max_new, [first], msg.t_recv, info)
                waiting.append((seq, arrays[0::2], arrays[1::2]))
            elif kind == tr.REQUEST:  # no prefill worker is left: prefill here
                seen.add(rid)
                pre = prefill(be, params, config, msg.payload[0])
                info = {
                    "kv_bytes": 0,
                    "transfer_us": 0,
                    "prefill_us": int(pre.seconds * 1e6),
                    "worker": t.rank,
                    "digest_ok": True,
                    "digest": tr.digest(pre.arrays),
                }
                seq = Sequence(rid, msg.header[2], msg.header[3], [pre.first_token], time.time(), info)
                waiting.append((seq, pre.k, pre.v))
            elif kind == tr.DEAD:
                t.drop(msg.header[2])
            elif kind == tr.STOP:
                stopping = True
        while waiting and engine.can_admit(waiting[0][0].prompt_len, waiting[0][0].max_new):
            seq, k, v = waiting.popleft()
            for done in engine.admit(seq, k, v):
                finish(done)
        if engine.active:
            for done in engine.step():
                finish(done)
        elif stopping and not waiting:
            break
    t.drain(opts.timeout_s)
