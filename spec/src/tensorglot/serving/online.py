"""The HTTP server's engine: continuous batching of requests that arrive while it runs, in one thread.

The batch mode's router and workers (`tensorglot.serving.workers`) take a list of requests known before
they start; a server's requests arrive one by one from clients. `OnlineEngine` runs the same model code
— `tensorglot.serving.engine.prefill` and the `DecodeEngine` over the paged pool — in one background
thread of the server process, fed through a queue:

1. The HTTP handlers `submit` a `Job` (a validated prompt, its `SamplingParams`, two callbacks).
2. Each loop admits up to ``prefills_per_step`` waiting jobs whose whole block budget is free (prompt +
   max_tokens − 1 tokens, as `DecodeEngine.can_admit` reserves), prefills each alone (so its first token
   is `generate`'s), then runs one decode step over every active row. Jobs join and leave between steps.
3. Every token is chosen on the host by the job's own `Sampler` from float64 logits, then handed to
   ``job.on_token`` in this thread; it returns False when the text layer saw a stop string. A token in
   ``stop_token_ids`` ends the job unreported. ``job.on_finish(reason, error)`` ends every job once:
   ``"stop"``, ``"length"``, ``"cancelled"`` or ``"error"``.

`close` drains: new jobs are refused, the queued and active ones run to the end, then the thread exits.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Self

import numpy as np

from ..params import TransformerConfig
from .engine import DecodeEngine, Sequence
from .model import Model
from .prefix import Block, PrefixCache, PromptPrefill
from .sampling import Sampler, SamplingParams

logger = logging.getLogger("tensorglot.serving")


@dataclass(eq=False)
class Job:
    """One completion (one of a request's ``n`` choices) as the engine sees it."""

    prompt: np.ndarray  # (P,) int64, checked against the model by the caller
    params: SamplingParams
    on_token: Callable[[int], bool]  # in the engine thread; False: stop here (a stop string)
    on_finish: Callable[[str, str | None], None]  # (finish reason, error message)
    choice: int = 0
    cancelled: bool = False  # set by the caller (a client that went away); the engine drops the job
    submitted: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None  # seconds from submission to the first token
    sampler: Sampler = field(init=False)
    finished: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.sampler = Sampler(self.params, choice=self.choice)

    def finish(self, reason: str, error: str | None = None) -> None:
        if not self.finished:
            self.finished = True
            self.on_finish(reason, error)


class _Engine(DecodeEngine):
    """`DecodeEngine` whose step samples each row with its job's sampler and stops a job early."""

    def step(self) -> list[Sequence]:
        start = time.perf_counter()
        rows, logits = self.forward()
        logits = logits.astype(np.float64)  # (B, V)
        now, done = time.time(), []
        for rid, row in rows.items():
            seq = self.active[rid]
            job: Job | None = seq.info.get("job")
            token = int(np.argmax(logits[row])) if job is None else job.sampler(logits[row])
            seq.tokens.append(token)
            seq.times.append(now)
            reason = None if job is None else _offer(job, token, len(seq.tokens))
            if reason is not None or len(seq.tokens) >= seq.max_new:
                seq.info["reason"] = reason or "length"
                seq.t_last = now
                done.append(self.active.pop(rid))
                self.pool.release(rid)
        self.steps += 1
        self.step_seconds.append(time.perf_counter() - start)
        return done

    def drop(self, rid: int) -> Sequence:
        self.pool.release(rid)
        return self.active.pop(rid)


def _offer(job: Job, token: int, count: int) -> str | None:
    """Hand ``token`` (the job's ``count``-th) to the job; the finish reason if it ends the job here."""
    if token in job.params.stop_token_ids:
        return "stop"
    if not job.on_token(token):
        return "stop"
    return "length" if count >= job.params.max_tokens else None


class JobEngine:
    """What the HTTP server drives (`http.py`): `Job`s submitted from its handlers' threads and served by
    one background thread, a subclass's ``_run``, which ends once `close` was called and the queued and
    active jobs are done; ``ready`` is set once it can serve, ``load_error`` says why it cannot."""

    def __init__(self, thread_name: str) -> None:
        self.config: TransformerConfig | None = None
        self.ready = threading.Event()
        self.load_error: str | None = None
        self._inbox: queue.Queue[Job | None] = queue.Queue()
        self._closing = False
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def submit(self, job: Job) -> None:
        if self._closing:
            raise RuntimeError(f"{type(self).__name__}.submit: it is shutting down and takes no new requests")
        self._inbox.put(job)

    def close(self, timeout_s: float = 60.0) -> None:
        """Refuse new jobs, finish the queued and active ones, stop the thread."""
        self._closing = True
        self._inbox.put(None)  # wakes an idle loop
        self._thread.join(timeout_s)

    def _run(self) -> None:
        raise NotImplementedError


class OnlineEngine(JobEngine):
    """Loads ``model`` and serves `Job`s in a background thread; ``ready`` is set once it can."""

    def __init__(
        self,
        model: Model,
        *,
        max_batch: int = 16,
        block_size: int = 16,
        prefix_cache_blocks: int = 0,
        chunk_tokens: int | None = None,
    ) -> None:
        if chunk_tokens is not None and chunk_tokens < 1:
            raise ValueError(f"OnlineEngine: chunk_tokens must be >= 1 or None, got {chunk_tokens}")
        super().__init__("tensorglot-engine")
        self.model, self.max_batch, self.block_size = model, max_batch, block_size
        self.chunk_tokens = chunk_tokens
        self.prefix = PrefixCache(block_size, prefix_cache_blocks) if prefix_cache_blocks else None
        self.stats = dict.fromkeys(("jobs", "prompt_tokens", "computed_prompt_tokens", "generated_tokens"), 0)
        self.stats["decode_steps"] = self.stats["cancelled"] = 0
        self._current: tuple[Job, list[Block], PromptPrefill | None] | None = None  # the prefill in progress

    def _run(self) -> None:
        try:
            be, params, config = self.model.load()
            engine = _Engine(be, params, config, max_batch=self.max_batch, block_size=self.block_size)
            engine.warm_up()
        except Exception as exc:  # reported by /health: the server cannot serve
            logger.exception("OnlineEngine: loading the model failed")
            self.load_error = f"{type(exc).__name__}: {exc}"
            self.ready.set()
            return
        self.config = config
        self.ready.set()
        waiting: deque[Job] = deque()
        while True:
            idle = not waiting and not engine.active and self._current is None
            closing = self._closing  # read once: close() may come between here and the wait
            self._take(waiting, block=idle and not closing)  # close()'s None may have been taken while busy
            if closing and idle and not waiting and self._inbox.empty():
                return
            self._drop_cancelled(engine, waiting)
            self._prefill(engine, waiting)
            if engine.active:
                try:
                    finished = engine.step()
                except Exception as exc:  # these jobs fail, the server serves on
                    logger.exception("OnlineEngine: a decode step failed")
                    finished = [engine.drop(rid) for rid in list(engine.active)]
                    for seq in finished:
                        seq.info["reason"], seq.info["error"] = "error", f"{type(exc).__name__}: {exc}"
                self.stats["decode_steps"] += 1
                for seq in finished:
                    self.stats["generated_tokens"] += len(seq.tokens)
                    seq.info["job"].finish(seq.info["reason"], seq.info.get("error"))

    def _take(self, waiting: deque[Job], *, block: bool) -> None:
        try:
            item = self._inbox.get() if block else self._inbox.get_nowait()  # close() wakes it with None
            while True:
                if item is not None:
                    waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _drop_cancelled(self, engine: _Engine, waiting: deque[Job]) -> None:
        dropped = [j for j in waiting if j.cancelled]
        for job in dropped:
            waiting.remove(job)
        for rid in [rid for rid, seq in engine.active.items() if seq.info["job"].cancelled]:
            dropped.append(engine.drop(rid).info["job"])
        if self._current is not None and self._current[0].cancelled:
            dropped.append(self._current[0])
            self._end_prefill()
        for job in dropped:
            job.finish("cancelled")
        self.stats["cancelled"] += len(dropped)

    def _prefill(self, engine: _Engine, waiting: deque[Job]) -> None:
        """One unit of prefill work: start the next waiting job if none is in progress and its whole
        block budget is free (first come, first served), then run its next chunk (or all of it)."""
        if self._current is None and waiting:
            job = waiting[0]
            if engine.active and not engine.can_admit(len(job.prompt), job.params.max_tokens):
                return  # wait for blocks to come back
            waiting.popleft()
            self._current = (job, self.prefix.match(job.prompt) if self.prefix else [], None)
        if self._current is None:
            return
        job, blocks, state = self._current
        try:
            if state is None:
                state = PromptPrefill(engine.be, engine.params, engine.config, job.prompt, blocks)
                self._current = (job, blocks, state)
            if not state.run(self.chunk_tokens):
                return
            pre = state.finish()
        except Exception as exc:  # this job fails, the others run on
            logger.exception("OnlineEngine: a prefill failed")
            self._end_prefill()
            job.finish("error", f"{type(exc).__name__}: {exc}")
            return
        self._end_prefill()
        if self.prefix:
            self.prefix.store(job.prompt, pre.k, pre.v)
        P = len(job.prompt)
        self.stats["jobs"] += 1
        self.stats["prompt_tokens"] += P
        self.stats["computed_prompt_tokens"] += P - state.cached
        assert pre.logits is not None
        token = job.sampler(pre.logits)
        job.first_token_s = time.perf_counter() - job.submitted
        reason = _offer(job, token, 1)
        if reason is not None:
            self.stats["generated_tokens"] += 1
            job.finish(reason)
            return
        seq = Sequence(next(self._ids), P, job.params.max_tokens, [token], time.time(), info={"job": job})
        engine.admit(seq, pre.k, pre.v)

    def _end_prefill(self) -> None:
        if self._current is not None and self.prefix:
            self.prefix.unpin(self._current[1])
        self._current = None
