"""The router (rank 0) of disaggregated serving: ranks 1..P prefill, ranks P + 1..P + M decode.

Routing. A request goes to the live prefill worker with the fewest in flight (at most ``max_inflight``
each), or, when no prefill worker is left, straight to its decode worker, which prefills it itself. Its
decode worker is chosen when it is first routed, by load: the live decode worker with the least
outstanding work, where a request's work is the tokens it may still generate (``max_new_tokens``)
plus the KV blocks its whole budget holds (``prompt + max_new − 1`` tokens); a request counts until its
DONE arrives; ties go to the lowest rank. With prefix caching (``prefix_blocks``) the pair is chosen
by the blocks it saves first (`tensorglot.serving.mirror`, whose copy of every worker's cache the
router keeps), and the REQUEST also names the request's turn at its decode worker and the prompt tokens
that worker supplies. The prefill worker is told the decode rank in the REQUEST header and sends the
KV there. A request recomputed after a prefill worker's death keeps its decode
worker (whose first-KV-wins rule drops a late duplicate).

Faults. The router expects, for each request it handed a prefill worker, the decode worker's RECEIVED;
a prefill worker that makes no progress for ``timeout_s`` (dead or hung), or that a send cannot reach,
is declared dead — logged, the decode workers told to stop listening to it — and its requests are
recomputed elsewhere with the same tokens. A decode worker that fails or sends nothing for
``timeout_s`` costs its unfinished requests only: they are prefilled again and decoded on another
decode worker. When no decode worker is left the unfinished requests fail with the reason.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import numpy as np

from ..params import TransformerConfig
from . import transport as tr
from .admission import Arrivals, Request
from .metrics import rejected_record, request_record
from .mirror import Mirrors


def route(live: list[int], inflight: dict[int, list[int]], max_inflight: int) -> int | None:
    """The least loaded live prefill worker with room; None when all are full."""
    ready = [w for w in live if len(inflight[w]) < max_inflight]
    return min(ready, key=lambda w: len(inflight[w])) if ready else None


def work(req: Request, block_size: int) -> int:
    """A request's outstanding work on its decode worker: tokens to generate + blocks its budget holds."""
    return req.max_new_tokens + -(-(len(req.prompt) + req.max_new_tokens - 1) // block_size)


class Router:
    """The router's state and one step of its loop (`dispatch`, then `receive`); `run_batch` drives it
    over a list of requests known at start."""

    def __init__(self, t: tr.Transport, opts: Any, config: TransformerConfig) -> None:
        self.t, self.opts, self.config = t, opts, config
        P, M = opts.prefill_workers, opts.decode_workers
        self.live = list(range(1, P + 1))  # prefill ranks alive
        self.decode = list(range(P + 1, P + M + 1))  # decode ranks alive
        t.listen([*self.live, *self.decode])  # READY, BEAT and, from decode workers, RECEIVED and DONE
        self.inflight: dict[int, list[int]] = {w: [] for w in self.live}
        self.progress = dict.fromkeys(self.live, 0.0)
        self.seen = dict.fromkeys([*self.live, *self.decode], time.monotonic())  # last heard from
        self.outstanding: dict[int, dict[int, int]] = {d: {} for d in self.decode}  # decode → rid → work
        self.assigned: dict[int, int] = {}  # rid → its decode rank, until DONE
        self.ready: set[int] = set()
        self.by_id: dict[int, Request] = {}
        self.waiting = deque[Request]()
        self.recomputed: set[int] = set()
        self.results: dict[int, dict[str, Any]] = {}
        self.events: list[str] = []
        self.decode_error: str | None = None  # set when the last decode worker is gone
        self.sampling: dict[int, np.ndarray] = {}  # a server's requests: `tr.pack_sampling`
        # Every worker's prefix cache, and each routed request's (decode rank, seq, supplied tokens).
        self.mirrors = (
            Mirrors(self.live, self.decode, opts.block_size, opts.prefix_blocks) if opts.prefix_blocks else None
        )
        self.plans: dict[int, tuple[int, int, int]] = {}
        self.orphans: dict[int, int] = {}  # a cancelled request whose KV is still to come → its prefill rank

    # -- routing -----------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        """Queue a request the router has checked (a 1-D int64 prompt in the vocabulary)."""
        self.by_id[req.rid] = req
        self.waiting.append(req)

    def pick_decode(self, req: Request) -> int:
        kept = self.assigned.get(req.rid)
        if kept in self.outstanding:
            return kept
        return min(self.decode, key=lambda d: (sum(self.outstanding[d].values()), d))

    def pick(self, req: Request, prompt: np.ndarray) -> tuple[int | None, int] | None:
        """The (prefill rank or None, decode rank) for ``req``, None when every prefill worker is full:
        without prefix caching the least loaded of each; with it `tensorglot.serving.mirror`'s pair rule."""
        if self.mirrors is None:
            w = route(self.live, self.inflight, self.opts.max_inflight) if self.live else None
            return None if self.live and w is None else (w, self.pick_decode(req))
        ready: list[int | None] = [w for w in self.live if len(self.inflight[w]) < self.opts.max_inflight]
        if self.live and not ready:
            return None
        kept = self.assigned.get(req.rid)
        decodes = [kept] if kept in self.outstanding else self.decode
        mirrors = self.mirrors

        def rank(pair: tuple[int | None, int]) -> tuple[int, ...]:
            w, d = pair
            held = 0 if w is None else len(self.inflight[w])
            return -sum(mirrors.savings(prompt, w, d)), held, sum(self.outstanding[d].values()), w or 0, d

        return min(((w, d) for w in (ready or [None]) for d in decodes), key=rank)

    def plan(self, rid: int, prompt: np.ndarray, w: int | None, d: int) -> tuple[int, int]:
        """Update the mirrors for ``rid`` routed to (w, d); its (seq, supplied tokens) at ``d``. A request
        recomputed after its prefill worker's death keeps its plan (its turn at ``d`` is counted)."""
        assert self.mirrors is not None
        kept = self.plans.get(rid)
        _, supplied = self.mirrors.savings(prompt, w, d)
        origins = self.mirrors.prefill_routed(rid, prompt, w)
        if kept is not None and kept[0] == d:
            return kept[1], kept[2]
        seq = self.mirrors.decode_routed(prompt, d, origins)
        self.plans[rid] = (d, seq, supplied * self.opts.block_size)
        return self.plans[rid][1:]

    def dispatch(self) -> None:
        while self.waiting and self.decode:
            req = self.waiting[0]
            prompt = np.asarray(req.prompt, dtype=np.int64)
            picked = self.pick(req, prompt)
            if picked is None:
                break
            self.waiting.popleft()
            w, d = picked
            seq, supplied = self.plan(req.rid, prompt, w, d) if self.mirrors is not None else (-1, 0)
            sampling = self.sampling.get(req.rid)
            extra = [] if sampling is None else [sampling]
            head = tr.header(
                tr.REQUEST, req.rid, len(prompt), req.max_new_tokens, d, sum(map(len, extra)), seq, supplied
            )
            self.t.send(d if w is None else w, head, [prompt, *extra])
            self.assigned[req.rid] = d
            self.outstanding[d][req.rid] = work(req, self.opts.block_size)
            if w is not None:
                if not self.inflight[w]:
                    self.progress[w] = time.monotonic()
                self.inflight[w].append(req.rid)

    def cancel(self, rid: int) -> None:
        """Forget request ``rid`` and tell its decode worker to drop it (a server's request only)."""
        if rid in self.by_id:
            self.waiting = deque(r for r in self.waiting if r.rid != rid)
        for w, rids in self.inflight.items():
            if rid in rids:
                rids.remove(rid)
                if rid in self.plans:  # its KV still comes, and takes its turn at the decode worker
                    self.orphans[rid] = w
        d = self.assigned.pop(rid, None)
        if d in self.outstanding:
            self.outstanding[d].pop(rid, None)
            self.t.send(d, tr.header(tr.CANCEL, rid))
        self.by_id.pop(rid, None)
        self.sampling.pop(rid, None)

    def tokens(self, rid: int, tokens: np.ndarray) -> None:
        """A TOKEN message: a server's request's next tokens (the batch router ignores them)."""

    def requeue(self, rids: list[int]) -> None:
        for rid in reversed(rids):
            self.waiting.appendleft(self.by_id[rid])
            self.recomputed.add(rid)

    # -- faults ------------------------------------------------------------------------------------
    def declare_dead(self, w: int, why: str) -> None:
        self.live.remove(w)
        lost = self.inflight.pop(w)
        where = f"prefill rank(s) {self.live}" if self.live else f"the decode rank(s) {self.decode}"
        self.events.append(f"prefill worker rank {w} {why}; recomputing request(s) {lost} on {where}")
        for d in self.decode:
            self.t.send(d, tr.header(tr.DEAD, -1, w))
        self.t.drop(w)
        if self.mirrors is not None:
            self.mirrors.forget(w)
        for rid in [rid for rid, src in self.orphans.items() if src == w]:
            del self.orphans[rid]
            d, seq, _ = self.plans.pop(rid)
            if d in self.outstanding:
                self.t.send(d, tr.header(tr.SKIP, rid, seq))
        self.requeue(lost)

    def decode_lost(self, d: int, why: str) -> None:
        self.decode.remove(d)
        self.t.drop(d)
        if self.mirrors is not None:
            self.mirrors.forget(d)
        for rid in [rid for rid, plan in self.plans.items() if plan[0] == d]:
            del self.plans[rid]
            self.orphans.pop(rid, None)
        lost = sorted(self.outstanding.pop(d))
        if not self.decode:
            self.decode_error = f"the decode worker (rank {d}) {why}"
            return
        for rid in lost:
            del self.assigned[rid]
            for rids in self.inflight.values():
                if rid in rids:
                    rids.remove(rid)
        self.events.append(f"the decode worker (rank {d}) {why}; recomputing request(s) {lost} on decode rank(s) "
                           f"{self.decode}")  # fmt: skip
        self.requeue(lost)

    # -- messages ----------------------------------------------------------------------------------
    def receive(self, timeout: float) -> None:
        """One message, if any: who is alive, ready, done; a worker silent past the timeout is dead."""
        msg = self.t.recv(timeout)
        if msg is not None and msg.header is None:
            if msg.src in self.decode:
                self.decode_lost(msg.src, f"failed: {msg.error}")
            elif msg.src in self.live:
                self.declare_dead(msg.src, f"could not be reached ({msg.error})")
        elif msg is not None and msg.header is not None:
            self.seen[msg.src] = time.monotonic()
            head = msg.header
            kind, rid = head[0], head[1]
            if kind == tr.READY:
                self.ready.add(msg.src)
            elif kind == tr.RECEIVED:
                w = head[2]
                self.orphans.pop(rid, None)
                if w in self.inflight and rid in self.inflight[w]:
                    self.inflight[w].remove(rid)
                if w in self.progress:
                    self.progress[w] = time.monotonic()
            elif kind == tr.TOKEN and msg.src in self.outstanding and rid in self.outstanding[msg.src]:
                self.tokens(rid, msg.payload[0])
            elif kind == tr.DONE and msg.src in self.outstanding and rid not in self.results and rid in self.by_id:
                self.outstanding[msg.src].pop(rid, None)
                self.assigned.pop(rid, None)
                self.plans.pop(rid, None)
                self.done(rid, head, msg.payload[0], msg.src, msg.payload[1])
        self.check_timeouts()

    def check_timeouts(self) -> None:
        now, timeout = time.monotonic(), self.opts.timeout_s
        for d in list(self.decode):
            if now - self.seen[d] > timeout:
                self.decode_lost(d, f"sent nothing for {timeout:g} s")
        for w in list(self.live):
            if now - self.seen[w] > timeout:
                self.declare_dead(w, f"sent nothing for {timeout:.1f} s (died or frozen)")
            elif self.inflight[w] and now - self.progress[w] > timeout:
                self.declare_dead(w, f"delivered nothing for {timeout:.1f} s (died or stopped answering)")
        for dst in self.t.failures():
            if dst in self.live:
                self.declare_dead(dst, "could not be reached (its connection failed)")

    def done(self, rid: int, head: list[int], tokens: np.ndarray, decode: int, times: np.ndarray) -> None:
        """Request ``rid`` is done: its tokens and their wall-clock times (µs, the first at the KV's arrival)."""
        first_us, last_us, kv_bytes, transfer_us, prefill_us, worker, ok, dig = head[3:11]
        self.results[rid] = request_record(
            self.by_id[rid], tokens.tolist(), t_first=first_us / 1e6, t_last=last_us / 1e6, kv_bytes=kv_bytes,
            transfer_s=transfer_us / 1e6, prefill_s=prefill_us / 1e6, worker=worker,
            recomputed=rid in self.recomputed, kv_digest_ok=bool(ok), token_times=(times / 1e6).tolist(),
        )  # fmt: skip
        self.results[rid]["kv_digest"] = dig
        self.results[rid]["decode_worker"] = decode
        self.results[rid]["prefill_cached_tokens"] = int(head[11])
        self.results[rid]["decode_cached_tokens"] = int(head[12])  # prompt tokens whose KV was not sent
        self.results[rid]["kv_bytes_saved"] = int(head[13])

    def wait_ready(self) -> None:
        """Until every worker has loaded its model (or is gone): the clock starts then."""
        while self.decode_error is None and not self.ready >= {*self.live, *self.decode}:
            self.receive(0.01)

    def stop(self) -> None:
        for dst in [*self.live, *self.decode]:
            self.t.send(dst, tr.header(tr.STOP))
        self.t.drain(self.opts.timeout_s)


def router(t: tr.Transport, opts: Any, requests: list[Request], config: TransformerConfig, out: Any) -> None:
    """Rank 0 of a batch run: route ``requests`` as they arrive, put the records on ``out``."""
    r = Router(t, opts, config)
    r.wait_ready()
    out.put(("started", None))
    arrivals = Arrivals(requests)
    ids = {req.rid for req in requests}
    while len(r.results) < len(requests) and r.decode_error is None:
        before = len(r.results)
        for error in arrivals.admit(config, r.waiting, r.results):
            r.events.append(f"rejected: {error}")
        for req in r.waiting:
            r.by_id[req.rid] = req
        r.dispatch()
        r.receive(arrivals.wait_s(0.002))
        if len(r.results) != before:
            out.put(("progress", len(r.results)))
    wall = time.time() - arrivals.t0
    if r.decode_error is not None:  # what completed is kept; the rest fail with the reason
        unfinished = [rid for rid in ids if rid not in r.results]
        r.events.append(f"{r.decode_error}; request(s) {sorted(unfinished)} failed")
        for req in requests:
            if req.rid not in r.results:
                r.results[req.rid] = rejected_record(req, f"request {req.rid}: {r.decode_error}")
    r.stop()
    out.put(("result", {"requests": [r.results[q.rid] for q in requests], "events": r.events, "wall_s": wall}))
