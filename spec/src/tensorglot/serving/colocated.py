"""Prefill and decode interleaved in one process, for comparison with the disaggregated ranks: each
loop prefills one arrived request (prefill first, as vLLM schedules by default), then runs one decode
step over every active request. `tensorglot.serving.serve` runs it in a fresh process with the same
thread settings as the ranks."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from .admission import Arrivals, Request
from .engine import DecodeEngine, Sequence, prefill
from .metrics import request_record
from .model import Model


def run_colocated(requests: list[Request], model: Model, opts: Any, *, on_progress: Any = None) -> dict[str, Any]:
    be, params, config = model.load()
    engine = DecodeEngine(be, params, config, max_batch=opts.max_batch, block_size=opts.block_size)
    engine.warm_up()
    arrivals, waiting = Arrivals(requests), deque[Request]()
    results: dict[int, dict[str, Any]] = {}
    info: dict[int, tuple[Request, float]] = {}

    def record(seq: Sequence) -> None:
        req, prefill_s = info[seq.rid]
        results[seq.rid] = request_record(
            req, seq.tokens, t_first=seq.t_first, t_last=seq.t_last, kv_bytes=0, transfer_s=0.0,
            prefill_s=prefill_s, worker=0, recomputed=False, kv_digest_ok=True,
        )  # fmt: skip
        if on_progress is not None:
            on_progress(len(results))

    while len(results) < len(requests):
        arrivals.admit(config, waiting, results)
        if waiting and engine.can_admit(len(waiting[0].prompt), waiting[0].max_new_tokens):
            req = waiting.popleft()
            pre = prefill(be, params, config, req.prompt)
            info[req.rid] = (req, pre.seconds)
            seq = Sequence(req.rid, len(req.prompt), req.max_new_tokens, [pre.first_token], time.time())
            for done in engine.admit(seq, pre.k, pre.v):
                record(done)
        if engine.active:
            for done in engine.step():
                record(done)
        elif not waiting and arrivals:
            time.sleep(arrivals.wait_s(0.001))
    return {"requests": [results[r.rid] for r in requests], "events": [], "wall_s": time.time() - arrivals.t0}
