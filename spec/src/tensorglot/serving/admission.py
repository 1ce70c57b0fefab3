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
    prompt: Any  # (P,) int64 ids; anything else is rejected with its reason (`check_request`)
    max_new_tokens: int
    arrival_s: float = 0.0  # offset from the start of serving
    arrival: float = 0.0  # wall clock, set when it arrives


def check_request(req: Request, config: TransformerConfig) -> str | None:
    """The error of a request the model cannot serve, else None: a prompt that is not a 1-D sequence of
    integer token ids in [0, vocab_size) (a float id is refused, never truncated), an empty one,
    ``max_new_tokens`` not an int >= 1, or more tokens than the context holds."""
    n = req.max_new_tokens
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        return f"request {req.rid}: max_new_tokens must be an int >= 1, got {n!r}"
    error = _prompt_error(req.prompt, config.vocab_size)
    if error is not None:
        return f"request {req.rid}: {error}"
    P = len(req.prompt)
    if P + n > config.max_seq_len:
        return (
            f"request {req.rid}: prompt of {P} tokens + {n} new tokens = {P + n} is longer than the "
            f"model's context (max_seq_len = {config.max_seq_len})"
        )
    return None


def _prompt_error(prompt: Any, vocab_size: int) -> str | None:
    try:
        ids = np.asarray(prompt)
    except (ValueError, TypeError):  # ragged, or of mixed kinds
        return f"the prompt must be a flat list of token ids, got {_short(prompt)}"
    if ids.ndim != 1:
        return f"the prompt must be 1-D (a list of token ids), got shape {ids.shape}: {_short(prompt)}"
    if ids.size == 0:
        return "needs a prompt of >= 1 token, got an empty one"
    if ids.dtype.kind == "O" and all(isinstance(t, int) and not isinstance(t, bool) for t in ids.tolist()):
        ints = ids.tolist()  # Python ints too large for int64
        return f"token ids must lie in [0, {vocab_size}), got [{min(ints)}, {max(ints)}]"
    if ids.dtype.kind not in "iu":
        return f"token ids must be ints, got {ids.dtype} values: {_short(prompt)}"
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        return f"token ids must lie in [0, {vocab_size}), got [{lo}, {hi}]"
    return None


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value.tolist() if isinstance(value, np.ndarray) else value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
                req.prompt = np.asarray(req.prompt, dtype=np.int64)  # exact: checked to be ints in range
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
