"""Disaggregated serving with a paged KV cache: prefill and decode workers over ``torch.distributed``.

`serve` runs a list of requests either disaggregated (a router, ``prefill_workers`` prefill processes
and one decode process; each prefill sends its request's KV to the decode worker layer by layer) or
colocated (prefill and decode interleaved in this process, for comparison), and returns the tokens and
metrics of every request plus a summary. The model runs through the spec's public API of any backend
(`tensorglot.get_backend(name).layers`); the transport is torch.distributed whatever the backend.
See docs/serving.md.

>>> import numpy as np, tensorglot
>>> from tensorglot_torch.serving import Model, Request, serve
>>> cfg = tensorglot.TransformerConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
...                                    head_dim=8, d_ff=32, max_seq_len=32)
>>> model = Model("numpy", cfg.to_dict(), seed=0)
>>> out = serve([Request(0, np.array([1, 2, 3]), 4)], model, colocated=True)
>>> len(out["requests"][0]["tokens"]), out["summary"]["completed"]
(4, 1)
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from .engine import DecodeEngine, Prefilled, prefill
from .metrics import rejected_record, request_record, summarize
from .paged import PagedKVPool
from .workers import Fault, Model, Options, Request, check_request, run_disaggregated, run_in_process

__all__ = [
    "DecodeEngine",
    "Fault",
    "Model",
    "Options",
    "PagedKVPool",
    "Prefilled",
    "Request",
    "prefill",
    "run_colocated",
    "serve",
]


def serve(
    requests: list[Request],
    model: Model,
    *,
    prefill_workers: int = 1,
    colocated: bool = False,
    timeout_s: float = 30.0,
    max_batch: int = 16,
    block_size: int = 16,
    threads: int = 1,
    faults: list[Fault] | None = None,
    on_progress: Any = None,
    deadline_s: float = 600.0,
) -> dict[str, Any]:
    """Serve ``requests`` with ``model``; returns ``{"requests": [...], "summary": {...}, "events": [...]}``.

    Each request record has ``prompt``, ``tokens`` (the generated ids, the first from prefill),
    ``ttft_s``, ``tpot_s``, ``e2e_s``, ``kv_bytes``, ``transfer_s``, ``worker``, ``recomputed`` and
    ``error`` (a request longer than the context is rejected with a message; the others run).
    """
    opts = Options(
        prefill_workers=prefill_workers,
        timeout_s=timeout_s,
        max_batch=max_batch,
        block_size=block_size,
        threads=threads,
        faults=list(faults or []),
    )
    if prefill_workers < 1 and not colocated:
        raise ValueError(f"serve: prefill_workers must be >= 1, got {prefill_workers}")
    ids = [r.rid for r in requests]
    if len(set(ids)) != len(ids):
        raise ValueError("serve: request ids must be unique")
    if colocated:
        result = run_in_process(run_colocated, requests, model, opts, on_progress=on_progress, deadline_s=deadline_s)
    else:
        _, _, config = _config_only(model)
        result = run_disaggregated(requests, model, config, opts, on_progress=on_progress, deadline_s=deadline_s)
    mode = "colocated" if colocated else f"disaggregated ({prefill_workers} prefill + 1 decode)"
    result["summary"] = summarize(result["requests"], mode=mode, wall_s=result.pop("wall_s"))
    return result


def _config_only(model: Model):
    if model.checkpoint is None:
        from tensorglot.params import TransformerConfig

        assert model.config is not None
        return None, None, TransformerConfig.from_dict(model.config)
    return model.load()


def run_colocated(requests: list[Request], model: Model, opts: Options, *, on_progress: Any = None) -> dict[str, Any]:
    """Prefill and decode interleaved in one process (`serve` runs it in a fresh one, with the same thread
    settings as the disaggregated ranks): each loop prefills one arrived request (prefill
    first, as vLLM schedules by default), then runs one decode step over every active request."""
    import torch

    be, params, config = model.load()
    engine = DecodeEngine(be, params, config, max_batch=opts.max_batch, block_size=opts.block_size)
    engine.warm_up()
    arrivals = deque(sorted(requests, key=lambda r: r.arrival_s))
    waiting: deque[Request] = deque()
    results: dict[int, dict[str, Any]] = {}
    info: dict[int, tuple[Request, float]] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(opts.threads)
    t0 = time.time()

    def record(seq) -> None:
        req, prefill_s = info[seq.rid]
        results[seq.rid] = request_record(
            req,
            seq.tokens,
            t_first=seq.t_first,
            t_last=seq.t_last,
            kv_bytes=0,
            transfer_s=0.0,
            prefill_s=prefill_s,
            worker=0,
            recomputed=False,
            kv_digest_ok=True,
        )
        if on_progress is not None:
            on_progress(len(results))

    try:
        while len(results) < len(requests):
            now = time.time()
            while arrivals and t0 + arrivals[0].arrival_s <= now:
                req = arrivals.popleft()
                req.arrival = t0 + req.arrival_s
                error = check_request(req, config)
                if error is None:
                    waiting.append(req)
                else:
                    results[req.rid] = rejected_record(req, error)
            if waiting and engine.can_admit(len(waiting[0].prompt), waiting[0].max_new_tokens):
                from .engine import Sequence

                req = waiting.popleft()
                pre = prefill(be, params, config, req.prompt)
                info[req.rid] = (req, pre.seconds)
                seq = Sequence(req.rid, req.max_new_tokens, [pre.first_token], time.time())
                for done in engine.admit(seq, pre.k, pre.v):
                    record(done)
            if engine.active:
                for done in engine.step():
                    record(done)
            elif not waiting and arrivals:
                time.sleep(min(0.001, max(0.0, t0 + arrivals[0].arrival_s - time.time())))
    finally:
        torch.set_num_threads(threads)
    return {"requests": [results[r.rid] for r in requests], "events": [], "wall_s": time.time() - t0}
