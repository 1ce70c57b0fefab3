"""Prefill and decode interleaved in one process, for comparison with the disaggregated ranks.

Each loop does one unit of prefill work, then one decode step over every active request. Without
``chunk_tokens`` the unit is a whole prompt (prefill first, as vLLM schedules by default); with it, the
next ``chunk_tokens`` tokens of the prompt in progress (Sarathi-Serve's chunked prefill,
arXiv:2403.02310), so a long prompt no longer stalls the running requests for its whole prefill — the
fair colocated baseline for disaggregation. Prompts run through `tensorglot.serving.prefix.PromptPrefill`,
as the HTTP server's engine runs them, first come first served, one at a time, each started only when its
whole block budget is free in the decode pool. `tensorglot.serving.serve` runs this loop in a fresh process
with the same thread settings as the ranks.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from .admission import Arrivals, Request
from .engine import DecodeEngine, Sequence
from .metrics import request_record
from .model import Model
from .prefix import PromptPrefill


def check_chunk(fn: str, name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{fn}: {name} must be an int >= 1 or None, got {value!r}")


def run_colocated(
    requests: list[Request], model: Model, opts: Any, *, on_progress: Any = None, chunk_tokens: int | None = None
) -> dict[str, Any]:
    """Serve ``requests``; returns ``{"requests": [...], "events": [], "wall_s"}`` (records in the given
    order, each with its tokens' ``itl_s``)."""
    check_chunk("run_colocated", "chunk_tokens", chunk_tokens)
    be, params, config = model.load()
    engine = DecodeEngine(be, params, config, max_batch=opts.max_batch, block_size=opts.block_size)
    engine.warm_up()
    arrivals, waiting = Arrivals(requests), deque[Request]()
    results: dict[int, dict[str, Any]] = {}
    info: dict[int, tuple[Request, float]] = {}
    current: tuple[Request, PromptPrefill] | None = None  # the prompt being prefilled

    def record(seq: Sequence) -> None:
        req, prefill_s = info[seq.rid]
        results[seq.rid] = request_record(
            req, seq.tokens, t_first=seq.t_first, t_last=seq.t_last, kv_bytes=0, transfer_s=0.0,
            prefill_s=prefill_s, worker=0, recomputed=False, kv_digest_ok=True, token_times=seq.times,
        )  # fmt: skip
        if on_progress is not None:
            on_progress(len(results))

    while len(results) < len(requests):
        arrivals.admit(config, waiting, results)
        if current is None and waiting and engine.can_admit(len(waiting[0].prompt), waiting[0].max_new_tokens):
            req = waiting.popleft()
            current = req, PromptPrefill(be, params, config, req.prompt)
        if current is not None and current[1].run(chunk_tokens):
            req, state = current
            current = None
            pre = state.finish()
            info[req.rid] = (req, pre.seconds)
            seq = Sequence(req.rid, len(req.prompt), req.max_new_tokens, [pre.first_token], time.time())
            for done in engine.admit(seq, pre.k, pre.v):
                record(done)
        if engine.active:
            for seq in engine.step():
                record(seq)
        elif current is None and not waiting and arrivals:
            time.sleep(arrivals.wait_s(0.001))
    return {"requests": [results[r.rid] for r in requests], "events": [], "wall_s": time.time() - arrivals.t0}
