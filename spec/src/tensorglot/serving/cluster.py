"""The HTTP server's engine over worker processes: `WorkerEngine` has `OnlineEngine`'s interface —
``submit(Job)``, the job's ``on_token``/``on_finish`` callbacks, ``ready``, ``config``, ``stats``,
``close`` — and serves through the disaggregated router and ranks (``tensorglot serve --port P
--prefill-workers N --decode-workers M``).

The prefill and decode ranks are spawned processes (`tensorglot.serving.launch.start_workers`); the
router, rank 0, runs in a thread of the server process and takes jobs as the HTTP handlers submit them
(`ServerRouter`). Each job travels as a request with its sampling (`transport.pack_sampling`): the
prefill worker sends the prompt's last logits with the KV and the decode worker draws every token with
the job's own seeded `Sampler`, as `OnlineEngine` does in-process, streaming them back in TOKEN
messages after each step. In this thread the router hands each token to the job (``on_token``; a stop
token id or a stop string ends it, and a CANCEL frees its decode row), and DONE delivers what is left.

A job without a seed gets one from the router, so a job recomputed after its decode worker was lost
draws the same tokens: the tokens its client already has are skipped when the new stream repeats them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import secrets
import threading
import time
from typing import Any

import numpy as np

from ..parallel.devices import PORT_ATTEMPTS, abandon_queue, port_taken, stop_processes
from ..params import TransformerConfig
from . import transport as tr
from .admission import Request
from .launch import start_workers
from .model import Model
from .online import Job, JobEngine, _offer
from .router import Router
from .workers import Options

logger = logging.getLogger("tensorglot.serving")


class ServerRouter(Router):
    """`Router` fed by a server's jobs: their tokens go to the jobs' callbacks, not to records."""

    def __init__(self, t: tr.Transport, opts: Options, config: TransformerConfig, stats: dict[str, int]) -> None:
        super().__init__(t, opts, config)
        self.jobs: dict[int, Job] = {}
        self.delivered: dict[int, int] = {}  # tokens handed to each job
        self.received: dict[int, int] = {}  # tokens of each job's current stream (reset by a recompute)
        self.stats = stats

    def submit(self, rid: int, job: Job) -> None:
        params = (
            job.params if job.params.seed is not None else dataclasses.replace(job.params, seed=secrets.randbits(52))
        )
        req = Request(rid, job.prompt, params.max_tokens)
        req.arrival = time.time()
        self.jobs[rid], self.delivered[rid], self.received[rid] = job, 0, 0
        self.sampling[rid] = tr.pack_sampling(params, job.choice)
        self.stats["jobs"] += 1
        self.stats["prompt_tokens"] += len(job.prompt)
        self.add(req)

    def tokens(self, rid: int, tokens: np.ndarray) -> None:
        for token in tokens.tolist():
            self.received[rid] += 1
            if self.received[rid] > self.delivered[rid] and not self._give(rid, token):
                return

    def _give(self, rid: int, token: int) -> bool:
        job = self.jobs[rid]
        self.delivered[rid] += 1
        if job.first_token_s is None:
            job.first_token_s = time.perf_counter() - job.submitted
        reason = _offer(job, token, self.delivered[rid])
        if reason is not None:
            self.end(rid, reason)
        return reason is None

    def done(self, rid: int, head: list[int], tokens: np.ndarray, decode: int, times: np.ndarray) -> None:
        self.stats["prefill_cached_tokens"] += head[11]  # of the jobs decoded to their end
        self.stats["decode_cached_tokens"] += head[12]
        if rid not in self.jobs:
            return
        for token in tokens.tolist()[self.delivered[rid] :]:
            if not self._give(rid, token):
                return
        self.end(rid, "length")

    def end(self, rid: int, reason: str, error: str | None = None) -> None:
        job = self.jobs.pop(rid)
        self.stats["generated_tokens"] += self.delivered.pop(rid)
        self.received.pop(rid)
        self.cancel(rid)  # its decode worker drops it (nothing to drop once it sent DONE)
        if reason == "cancelled":
            self.stats["cancelled"] += 1
        job.finish(reason, error)

    def decode_lost(self, d: int, why: str) -> None:
        lost = list(self.outstanding.get(d, {}))
        super().decode_lost(d, why)
        for rid in lost:
            if rid in self.received:
                self.received[rid] = 0  # the new stream starts again at the first token
        self.stats["recomputed"] += len(lost)
        logger.warning("the decode worker (rank %d) %s; its request(s) %s are recomputed if any is left", d, why, lost)


class WorkerEngine(JobEngine):
    """Starts the worker processes and the router thread; ``ready`` is set once every worker is."""

    def __init__(self, model: Model, opts: Options) -> None:
        super().__init__("tensorglot-router")
        self.model, self.opts = model, opts
        self.prefix = None  # /health shows no in-process prefix cache
        counts = ("jobs", "prompt_tokens", "generated_tokens", "cancelled", "recomputed")
        self.stats = dict.fromkeys((*counts, "prefill_cached_tokens", "decode_cached_tokens"), 0)
        self.procs: list[Any] = []
        self._errors: Any = None  # the workers' error queue

    def close(self, timeout_s: float = 60.0) -> None:
        """Refuse new jobs, finish the queued and running ones, stop the router and the workers."""
        super().close(timeout_s)
        stop_processes(self.procs, grace=5)
        if self._errors is not None:
            with contextlib.suppress(OSError, ValueError):
                while not self._errors.empty():
                    kind, text = self._errors.get_nowait()
                    if kind == "error":
                        logger.error("WorkerEngine: %s", text)
            abandon_queue(self._errors)

    def _connect(self, config: TransformerConfig) -> ServerRouter:
        factory = tr.get_transport(self.opts.transport)
        world = self.opts.prefill_workers + self.opts.decode_workers + 1
        if self.opts.address is not None:  # torchrun started the workers (`tensorglot.serving.torchrun`)
            opts = self.opts
            t = factory(0, world, address=opts.address, timeout_s=opts.timeout_s, payload_spec=tr.payload_spec)
            return ServerRouter(t, self.opts, config, self.stats)
        for attempt in range(1, PORT_ATTEMPTS + 1):
            self.procs, port, self._errors = start_workers(self.model, self.opts)
            try:
                t = self._join(factory, world, port)
            except Exception as exc:
                stop_processes(self.procs, grace=0)
                if not port_taken(exc) or attempt == PORT_ATTEMPTS:
                    raise
                continue
            return ServerRouter(t, self.opts, config, self.stats)
        raise AssertionError("unreachable")

    def _join(self, factory: Any, world: int, port: int) -> tr.Transport:
        """Rank 0's transport, which waits for every rank: a rank that exits meanwhile fails the start."""
        got: queue.Queue[Any] = queue.Queue()

        def join() -> None:
            try:
                got.put(factory(0, world, address=f"tcp://127.0.0.1:{port}", timeout_s=self.opts.timeout_s,
                                payload_spec=tr.payload_spec))  # fmt: skip
            except Exception as exc:
                got.put(exc)

        threading.Thread(target=join, daemon=True, name="tensorglot-join").start()
        while True:
            try:
                t = got.get(timeout=0.2)
            except queue.Empty:
                for rank, p in enumerate(self.procs, start=1):
                    if p.exitcode is not None:
                        raise RuntimeError(f"rank {rank} exited during start-up with code {p.exitcode}") from None
                continue
            if isinstance(t, Exception):
                raise t
            return t

    def _run(self) -> None:
        try:
            config = self.model.load_config()
            router = self._connect(config)
            router.wait_ready()
            if router.decode_error is not None:
                raise RuntimeError(router.decode_error)
        except Exception as exc:  # reported by /health: the server cannot serve
            logger.exception("WorkerEngine: starting the workers failed")
            self.load_error = f"{type(exc).__name__}: {exc}"
            self.ready.set()
            return
        self.config = config
        self.ready.set()
        while True:
            while True:
                try:
                    job = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    router.submit(next(self._ids), job)
            for rid in [rid for rid, job in router.jobs.items() if job.cancelled]:
                router.end(rid, "cancelled")
            if router.decode_error is not None:
                for rid in list(router.jobs):
                    router.end(rid, "error", router.decode_error)
            if self._closing and not router.jobs and self._inbox.empty():
                break
            router.dispatch()
            router.receive(0.002 if router.jobs else 0.05)
        router.stop()
