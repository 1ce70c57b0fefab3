"""Disaggregated serving with a paged KV cache, for any backend with layers, over a plugin's transport.

`serve` runs a list of requests either disaggregated (a router, ``prefill_workers`` prefill processes
and one decode process; each prefill sends its request's KV to the decode worker layer by layer) or
colocated (prefill and decode interleaved in one process, for comparison), and returns the tokens and
metrics of every request plus a summary. The model runs through the public layers API of the backend
the `Model` names (``be.layers.transformer`` with a cache; every request's tokens equal
``be.layers.generate``'s); arrays cross processes as NumPy. Moving them is a `Transport` that a plugin
registers (tensorglot-torch: ``torch.distributed``). Modules, by concept: `admission` (requests, the
context check, arrivals), `engine` (prefill and the continuous-batching decode loop), `pool` (the
paged KV pool on `tensorglot.cache.PagedSlotMap`), `workers` (router with its routing policy, prefill
and decode ranks, faults), `transport` (the interface and the messages), `launch` (processes),
`colocated` (with chunked prefill), `metrics`, `cli` (``tensorglot serve``); `goodput` (attainment and
goodput, shared with the load generator) and `sweep` (``tensorglot bench serve``). The HTTP server
(``tensorglot serve --port``):
`sampling`, `online` (its in-process continuous-batching engine), `prefix`, `text`, `openai_schema`, `http`,
`measure`, `loadgen`. Prefix blocks on both sides of the handoff: `mirror` (the router's copy and the
pair rule), `handoff` (the decode worker's blocks). `torchrun`: the same ranks under torchrun.
See docs/serving.md.

>>> import numpy as np, tensorglot
>>> from tensorglot.serving import Model, Request, serve
>>> cfg = tensorglot.TransformerConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
...                                    head_dim=8, d_ff=32, max_seq_len=32)
>>> out = serve([Request(0, np.array([1, 2, 3]), 4)], Model("numpy", cfg.to_dict()), colocated=True)
>>> len(out["requests"][0]["tokens"]), out["summary"]["completed"]
(4, 1)
"""

from __future__ import annotations

import functools
import math
from typing import Any

from .admission import Request, check_request
from .colocated import check_chunk, run_colocated
from .engine import DecodeEngine, Prefilled, Sequence, prefill
from .launch import run_disaggregated, run_in_process
from .metrics import summarize
from .model import DEMO_MODEL, Model
from .online import Job, OnlineEngine
from .pool import PagedKVPool
from .sampling import Sampler, SamplingParams
from .transport import Message, Transport, get_transport
from .workers import Fault, Options

__all__ = [
    "DEMO_MODEL",
    "DecodeEngine",
    "Fault",
    "Job",
    "Message",
    "Model",
    "OnlineEngine",
    "Options",
    "PagedKVPool",
    "Prefilled",
    "Request",
    "Sampler",
    "SamplingParams",
    "Sequence",
    "Transport",
    "check_request",
    "get_transport",
    "prefill",
    "run_colocated",
    "serve",
]


def serve(
    requests: list[Request],
    model: Model,
    *,
    prefill_workers: int = 1,
    decode_workers: int = 1,
    prefix_blocks: int = 0,
    colocated: bool = False,
    prefill_chunk: int | None = None,
    transport: str | None = None,
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
    ``transport`` names a registered transport (None: torch's if installed); colocated needs none.
    ``prefill_chunk`` (colocated only): prefill ``T`` prompt tokens per loop, each followed by a decode step.
    """
    for name, count in (("prefill_workers", prefill_workers), ("decode_workers", decode_workers)):
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"serve: {name} must be an int >= 1, got {count!r}")
    for name, seconds in (("timeout_s", timeout_s), ("deadline_s", deadline_s)):
        # A zero timeout would declare every healthy worker dead at its first request.
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 < seconds < math.inf:
            raise ValueError(f"serve: {name} must be a positive, finite number of seconds, got {seconds!r}")
    check_chunk("serve", "prefill_chunk", prefill_chunk)
    if prefill_chunk is not None and not colocated:
        raise ValueError(f"serve: prefill_chunk={prefill_chunk!r} needs colocated=True (a worker prefills whole)")
    ids = [r.rid for r in requests]
    if len(set(ids)) != len(ids):
        raise ValueError("serve: request ids must be unique")
    opts = Options(
        prefill_workers=prefill_workers,
        decode_workers=decode_workers,
        prefix_blocks=prefix_blocks,
        timeout_s=timeout_s,
        max_batch=max_batch,
        block_size=block_size,
        threads=threads,
        transport=transport,
        faults=list(faults or []),
    )
    if colocated:
        loop = functools.partial(run_colocated, chunk_tokens=prefill_chunk)
        result = run_in_process(loop, requests, model, opts, on_progress=on_progress, deadline_s=deadline_s)
        mode = "colocated" if prefill_chunk is None else f"colocated (chunked prefill, {prefill_chunk} tokens)"
    else:
        config = model.load_config()
        result = run_disaggregated(requests, model, config, opts, on_progress=on_progress, deadline_s=deadline_s)
        mode = f"disaggregated ({prefill_workers} prefill + {decode_workers} decode)"
    result["summary"] = summarize(result["requests"], mode=mode, wall_s=result.pop("wall_s"))
    return result
