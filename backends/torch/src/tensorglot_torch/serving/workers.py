"""The ranks of disaggregated serving and the launcher that starts them.

Rank 0 is the router, ranks 1..P the prefill workers, rank P + 1 the decode worker; each is its own
process (``spawn``), joined by ``torch.distributed`` on a free local port (gloo; NCCL when there is a GPU
per rank). Only the router talks to the launcher (a multiprocessing queue: progress and the results).

Faults: the router keeps at most ``max_inflight`` requests per prefill worker and expects the decode
worker's RECEIVED for each; a worker that makes no progress for ``timeout_s`` (dead or hung) is
declared dead — logged, the decode worker told to stop listening to it — and its requests go to another
prefill worker, or to the decode worker itself when none is left. The decode side keeps the first KV
of a request and drops a late duplicate, so a recomputed request still yields the same tokens.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import queue as queue_mod
import socket
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import tensorglot
from tensorglot.params import TransformerConfig

from . import protocol as pr
from .engine import DecodeEngine, Sequence, prefill
from .metrics import rejected_record, request_record

logger = logging.getLogger("tensorglot.serving")


@dataclass
class Request:
    rid: int
    prompt: np.ndarray  # (P,) int64
    max_new_tokens: int
    arrival_s: float = 0.0  # offset from the start of serving
    arrival: float = 0.0  # wall clock, set when it arrives


@dataclass(frozen=True)
class Model:
    """What every rank loads: a backend and either a seeded random model or a Hugging Face checkpoint."""

    backend: str
    config: dict[str, Any] | None = None
    seed: int = 0
    checkpoint: str | None = None
    dtype: str = "float32"

    def load(self) -> tuple[Any, dict[str, Any], TransformerConfig]:
        be = tensorglot.get_backend(self.backend)
        if self.checkpoint is not None:
            from tensorglot.checkpoints import load_llama

            raw, config = load_llama(self.checkpoint, dtype=self.dtype)
        else:
            assert self.config is not None
            config = TransformerConfig.from_dict(self.config)
            raw = tensorglot.init_params(config, self.seed, dtype=self.dtype)
        return be, {k: be.asarray(v) for k, v in raw.items()}, config


@dataclass(frozen=True)
class Fault:
    """Fault injection for tests: prefill worker ``rank`` dies (``die``) or stops answering (``hang``)
    when its request number ``after`` (from 0) arrives."""

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
    faults: list[Fault] = field(default_factory=list)


def check_request(req: Request, config: TransformerConfig) -> str | None:
    """The error of a request the model cannot serve, else None."""
    P, n = len(req.prompt), req.max_new_tokens
    if P < 1 or n < 1:
        return f"request {req.rid}: needs a prompt of >= 1 token and max_new_tokens >= 1, got {P} and {n}"
    if P + n > config.max_seq_len:
        return (
            f"request {req.rid}: prompt of {P} tokens + {n} new tokens = {P + n} is longer than the "
            f"model's context (max_seq_len = {config.max_seq_len})"
        )
    lo, hi = int(np.min(req.prompt)), int(np.max(req.prompt))
    if lo < 0 or hi >= config.vocab_size:
        return f"request {req.rid}: token ids must lie in [0, {config.vocab_size}), got [{lo}, {hi}]"
    return None


# -- the ranks -------------------------------------------------------------------------------------


def _router(opts: Options, requests: list[Request], config: TransformerConfig, out: Any) -> None:
    decode = opts.prefill_workers + 1
    dist.barrier()  # every worker has loaded its model: the clock starts now
    outbox, inbox = pr.Outbox(opts.timeout_s), pr.Inbox([decode], opts.timeout_s)
    live = list(range(1, decode))
    inflight: dict[int, list[int]] = {w: [] for w in live}
    progress = dict.fromkeys(live, 0.0)
    by_id = {r.rid: r for r in requests}
    arrivals = deque(sorted(requests, key=lambda r: r.arrival_s))
    waiting: deque[Request] = deque()
    recomputed: set[int] = set()
    results: dict[int, dict[str, Any]] = {}
    events: list[str] = []
    t0 = time.time()

    def declare_dead(w: int, why: str) -> None:
        live.remove(w)
        lost = inflight.pop(w)
        where = f"prefill rank(s) {live}" if live else f"the decode rank {decode}"
        events.append(f"prefill worker rank {w} {why}; recomputing request(s) {lost} on {where}")
        outbox.send(decode, [pr.header(pr.DEAD, -1, w)])
        for rid in reversed(lost):
            waiting.appendleft(by_id[rid])
            recomputed.add(rid)

    while len(results) < len(requests):
        now = time.time()
        while arrivals and t0 + arrivals[0].arrival_s <= now:
            req = arrivals.popleft()
            req.arrival = t0 + req.arrival_s  # queueing behind a busy router counts toward TTFT
            error = check_request(req, config)
            if error is None:
                waiting.append(req)
            else:
                results[req.rid] = rejected_record(req, error)
                events.append(f"rejected: {error}")
                out.put(("progress", len(results)))
        while waiting:
            ready = [w for w in live if len(inflight[w]) < opts.max_inflight]
            if live and not ready:
                break
            target = min(ready, key=lambda w: len(inflight[w])) if live else decode
            req = waiting.popleft()
            P = len(req.prompt)
            prompt = torch.from_numpy(np.asarray(req.prompt, dtype=np.int64))
            outbox.send(target, [pr.header(pr.REQUEST, req.rid, P, req.max_new_tokens), prompt])
            if target != decode:
                if not inflight[target]:
                    progress[target] = time.monotonic()
                inflight[target].append(req.rid)
        wake = min((r.arrival_s + t0 - time.time() for r in list(arrivals)[:1]), default=0.002)
        msg = inbox.get(timeout=min(0.002, max(0.0, wake)))
        if msg is not None:
            _, h, payload, _ = msg
            if h is None:
                raise RuntimeError(f"the decode worker (rank {decode}) failed: {msg[3]}")
            kind, rid = h[0], h[1]
            if kind == pr.RECEIVED:
                w = h[2]
                if w in inflight and rid in inflight[w]:
                    inflight[w].remove(rid)
                if w in progress:
                    progress[w] = time.monotonic()
            elif kind == pr.DONE:
                first_us, last_us, kv_bytes, transfer_us, prefill_us, worker, ok, dig = h[3:11]
                results[rid] = request_record(
                    by_id[rid],
                    payload[0].tolist(),
                    t_first=first_us / 1e6,
                    t_last=last_us / 1e6,
                    kv_bytes=kv_bytes,
                    transfer_s=transfer_us / 1e6,
                    prefill_s=prefill_us / 1e6,
                    worker=worker,
                    recomputed=rid in recomputed,
                    kv_digest_ok=bool(ok),
                )
                results[rid]["kv_digest"] = dig
                out.put(("progress", len(results)))
        for w in list(live):
            if inflight[w] and time.monotonic() - progress[w] > opts.timeout_s:
                declare_dead(w, f"delivered nothing for {opts.timeout_s:.1f} s (died or stopped answering)")
        for dst in outbox.failures():
            if dst in live:
                declare_dead(dst, "could not be reached (its connection failed)")
    wall = time.time() - t0
    for dst in [*live, decode]:
        outbox.send(dst, [pr.header(pr.STOP)])
    outbox.drain(opts.timeout_s)
    out.put(("result", {"requests": [results[r.rid] for r in requests], "events": events, "wall_s": wall}))


def _prefill_worker(rank: int, opts: Options, model: Model, decode: int, fault: Fault | None) -> None:
    be, params, config = model.load()
    prefill(be, params, config, np.zeros(2, dtype=np.int64))  # warm-up: first calls are not timed
    dist.barrier()
    outbox, inbox = pr.Outbox(opts.timeout_s), pr.Inbox([0], opts.timeout_s)
    handled = 0
    while True:
        msg = inbox.get(timeout=1.0)
        if msg is None:
            continue
        _, h, payload, _ = msg
        if h is None or h[0] == pr.STOP:
            break
        rid, P, max_new = h[1], h[2], h[3]
        if fault is not None and handled >= fault.after:
            if fault.mode == "die":
                os._exit(3)
            time.sleep(3600)  # hang: alive, answering nothing (the launcher ends it)
        pre = prefill(be, params, config, payload[0].numpy())
        arrays = [a for kv in zip(pre.k, pre.v) for a in kv]  # k_0, v_0, k_1, v_1, ...
        head = pr.header(
            pr.KV, rid, P, max_new, pre.first_token, pr.DTYPES.index(str(arrays[0].dtype)),
            config.n_layers, config.n_kv_heads, config.head_dim, pr.now_us(), pr.digest(arrays),
            int(pre.seconds * 1e6), rank,
        )  # fmt: skip
        outbox.send(decode, [head, *(torch.from_numpy(a) for a in arrays)])  # zero-copy, layer by layer
        handled += 1
        for dst in outbox.failures():
            logger.warning("prefill rank %d: a send to rank %d failed or timed out", rank, dst)
    outbox.drain(opts.timeout_s)


def _decode_worker(rank: int, opts: Options, model: Model) -> None:
    be, params, config = model.load()
    engine = DecodeEngine(be, params, config, max_batch=opts.max_batch, block_size=opts.block_size)
    engine.warm_up()
    dist.barrier()
    outbox, inbox = pr.Outbox(opts.timeout_s), pr.Inbox(list(range(rank)), opts.timeout_s)
    seen: set[int] = set()
    waiting: deque[tuple[Sequence, list[np.ndarray], list[np.ndarray]]] = deque()
    stopping = False

    def finish(seq: Sequence) -> None:
        i = seq.info
        head = pr.header(
            pr.DONE, seq.rid, len(seq.tokens), int(seq.t_first * 1e6), int(seq.t_last * 1e6),
            i["kv_bytes"], i["transfer_us"], i["prefill_us"], i["worker"], int(i["digest_ok"]), i["digest"],
        )  # fmt: skip
        outbox.send(0, [head, torch.tensor(seq.tokens, dtype=torch.int64)])

    while True:
        idle = not engine.active and not waiting
        while (msg := inbox.get(timeout=0.002 if idle else 0.0)) is not None:
            src, h, payload, t_recv = msg
            idle = False
            if h is None:
                logger.warning("decode: rank %d is gone (%s); the router recomputes its requests", src, t_recv)
                continue
            kind, rid = h[0], h[1]
            if kind == pr.KV:
                max_new, first, sent_us, dig, prefill_us, worker = h[3], h[4], h[9], h[10], h[11], h[12]
                outbox.send(0, [pr.header(pr.RECEIVED, rid, src)])
                if rid in seen:
                    continue  # a late duplicate of a recomputed request
                seen.add(rid)
                arrays = [b.cpu().numpy() for b in payload]
                info = {
                    "kv_bytes": sum(a.nbytes for a in arrays),
                    "transfer_us": int(t_recv * 1e6) - sent_us,
                    "prefill_us": prefill_us,
                    "worker": worker,
                    "digest_ok": pr.digest(arrays) == dig,  # the bytes prefill computed, bit for bit
                    "digest": pr.digest(arrays),
                }
                waiting.append((Sequence(rid, max_new, [first], t_recv, info), arrays[0::2], arrays[1::2]))
            elif kind == pr.REQUEST:  # no prefill worker is left: prefill here
                if rid in seen:
                    continue
                seen.add(rid)
                pre = prefill(be, params, config, payload[0].numpy())
                info = {
                    "kv_bytes": 0,
                    "transfer_us": 0,
                    "prefill_us": int(pre.seconds * 1e6),
                    "worker": rank,
                    "digest_ok": True,
                    "digest": pr.digest([a for kv in zip(pre.k, pre.v) for a in kv]),
                }
                waiting.append((Sequence(rid, h[3], [pre.first_token], time.time(), info), pre.k, pre.v))
            elif kind == pr.DEAD:
                inbox.drop(h[2])
            elif kind == pr.STOP:
                stopping = True
        while waiting and engine.can_admit(len(waiting[0][1][0]), waiting[0][0].max_new):
            seq, k, v = waiting.popleft()
            for done in engine.admit(seq, k, v):
                finish(done)
        if engine.active:
            for done in engine.step():
                finish(done)
        elif stopping and not waiting:
            break
    outbox.drain(opts.timeout_s)


def _rank_main(rank: int, world: int, port: int, role: str, args: tuple, out: Any) -> None:
    try:
        torch.set_num_threads(args[0].threads)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(hours=1),  # idle receives wait on it; transfers have their own
        )
        if role == "router":
            _router(args[0], args[1], args[2], out)
        elif role == "prefill":
            _prefill_worker(rank, *args)
        else:
            _decode_worker(rank, *args)
    except BaseException:
        out.put(("error", f"rank {rank} ({role}):\n{traceback.format_exc()}"))
        out.close()
        out.join_thread()
        os._exit(1)
    out.close()
    out.join_thread()
    # Pending receives from a dead peer can make destroy_process_group wait; the work is done.
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _thread_env(threads: int):
    keys = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(dict.fromkeys(keys, str(threads)))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_disaggregated(
    requests: list[Request],
    model: Model,
    config: TransformerConfig,
    opts: Options,
    *,
    on_progress: Any = None,
    deadline_s: float = 600.0,
) -> dict[str, Any]:
    """Start router, prefill and decode ranks; return ``{"requests": [...], "events": [...], "wall_s"}``."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    P = opts.prefill_workers
    world, decode, port = P + 2, P + 1, free_port()
    faults = {f.rank: f for f in opts.faults}
    roles: list[tuple[str, tuple]] = [("router", (opts, requests, config))]
    roles += [("prefill", (opts, model, decode, faults.get(r))) for r in range(1, P + 1)]
    roles += [("decode", (opts, model))]
    with _thread_env(opts.threads):
        procs = [
            ctx.Process(target=_rank_main, args=(r, world, port, role, args, out), daemon=True)
            for r, (role, args) in enumerate(roles)
        ]
        for p in procs:
            p.start()
    result = None
    try:
        result = _collect(out, procs, [0, decode], on_progress, deadline_s)
    finally:
        for p in procs:
            p.join(timeout=5 if result is not None else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    for event in result["events"]:
        logger.warning(event)
    return result


def _process_main(fn: Any, requests: list[Request], model: Model, opts: Options, out: Any) -> None:
    try:
        torch.set_num_threads(opts.threads)
        result = fn(requests, model, opts, on_progress=lambda n: out.put(("progress", n)))
        out.put(("result", result))
    except BaseException:
        out.put(("error", f"the colocated process:\n{traceback.format_exc()}"))
    out.close()
    out.join_thread()


def run_in_process(
    fn: Any, requests: list[Request], model: Model, opts: Options, *, on_progress: Any, deadline_s: float
) -> dict[str, Any]:
    """``fn(requests, model, opts, on_progress=...)`` in a fresh spawned process (BLAS threads as set)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with _thread_env(opts.threads):
        proc = ctx.Process(target=_process_main, args=(fn, requests, model, opts, out), daemon=True)
        proc.start()
    try:
        return _collect(out, [proc], [0], on_progress, deadline_s)
    finally:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)


def _collect(out: Any, procs: list[Any], watch: list[int], on_progress: Any, deadline_s: float) -> dict[str, Any]:
    end = time.monotonic() + deadline_s
    while True:
        if time.monotonic() > end:
            raise TimeoutError(f"serving did not finish within {deadline_s:.0f} s")
        try:
            kind, payload = out.get(timeout=0.5)
        except queue_mod.Empty:
            for r in watch:
                if procs[r].exitcode not in (None, 0):
                    raise RuntimeError(f"rank {r} exited with code {procs[r].exitcode}") from None
            continue
        if kind == "progress" and on_progress is not None:
            on_progress(payload)
        elif kind == "error":
            raise RuntimeError(f"serving failed on {payload}")
        elif kind == "result":
            return payload
