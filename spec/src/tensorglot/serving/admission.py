"""Requests and their admission: what a request is, which ones the model cannot serve, and when each
arrives (`Arrivals`, shared by the router and the colocated loop)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..params import TransformerConfig
from .metrics import rejected_record


@dataclass
class Request:
    rid: int
    prompt: np.ndarray  # (P,) int64
    max_new_tokens: int
    arrival_s: float = 0.0  # offset from the start of serving
    arrival: float = 0.0  # wall clock, set when it arrives


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


class Arrivals:
    """Requests in arrival order; the clock starts at construction."""

    def __init__(self, requests: list[Request]) -> None:
        self.pending = deque(sorted(requests, key=lambda r: r.arrival_s))
        self.t0 = time.time()

    def __bool__(self) -> bool:
        return bool(self.pending)

    def due(self) -> Iterator[Request]:
        """The requests that have arrived by now, their wall-clock ``arrival`` set (queueing behind a
        busy loop counts toward TTFT)."""
        now = time.time()
        while self.pending and self.t0 + self.pending[0].arrival_s <= now:
            req = self.pending.popleft()
            req.arrival = self.t0 + req.arrival_s
            yield req

    def admit(self, config: TransformerConfig, waiting: deque[Request], results: dict[int, Any]) -> list[str]:
        """Queue the requests that have arrived on ``waiting``; record the ones the model cannot serve in
        ``results`` (by id) and return their errors."""
        errors = []
        for req in self.due():
            error = check_request(req, config)
            if error is None:
                waiting.append(req)
            else:
                results[req.rid] = rejected_record(req, error)
                errors.append(error)
        return errors

    def wait_s(self, cap: float) -> float:
        """Seconds until the next arrival, at most ``cap`` (``cap`` when none is left)."""
        if not self.pending:
            return cap
        return min(cap, max(0.0, self.t0 + self.pending[0].arrival_s - time.time()))
