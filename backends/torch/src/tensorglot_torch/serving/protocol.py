"""The wire protocol between router, prefill and decode ranks over ``torch.distributed`` point-to-point.

A message is a fixed header, ``HEADER`` int64 values ``[kind, rid, ...fields]``, then the payload
tensors its kind implies (`payload_spec`: their dtypes and shapes are in the header, so the receiver can
allocate them). Sends go through an `Outbox` (``isend`` on a thread per destination: a rank never
blocks on a send, so two ranks that send to each other cannot deadlock) and receives through an `Inbox`
(a thread per source); every payload transfer has a timeout, so a peer that dies raises and a peer that
stops answering times out. (gloo's ``Work.is_completed()`` stays False until ``wait()`` is called, so
polling it cannot work; blocking waits on threads can.)

Kinds and their fields (after kind, rid):
  REQUEST  prompt_len, max_new, arrival_us            payload: prompt (P,) int64
  KV       prompt_len, max_new, first_token, dtype, n_layers, K, H, sent_us, digest, prefill_us, worker
           payload: k_0, v_0, k_1, v_1, ... each (P, K, H) of dtype — one layer after another
  RECEIVED worker                                      (decode → router: request rid's KV arrived)
  DONE     n, first_us, last_us, kv_bytes, transfer_us, prefill_us, worker, digest_ok, digest
           payload: tokens (n,) int64
  DEAD     worker                                      (router → decode: stop listening to it)
  STOP                                                 (no more requests)
"""

from __future__ import annotations

import datetime
import hashlib
import queue
import threading
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

HEADER = 16
REQUEST, KV, RECEIVED, DONE, DEAD, STOP = range(1, 7)
DTYPES = ["float32", "float64", "float16"]  # what `Backend.to_numpy` gives (bfloat16 is widened)
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16}


def now_us() -> int:
    return time.time_ns() // 1000


def header(kind: int, rid: int = -1, *fields: int) -> torch.Tensor:
    h = torch.zeros(HEADER, dtype=torch.int64)
    values = [kind, rid, *fields]
    h[: len(values)] = torch.tensor(values, dtype=torch.int64)
    return h


def digest(arrays: list[np.ndarray]) -> int:
    """63 bits of BLAKE2b over the arrays' bytes: equal digests mean bit-identical KV."""
    h = hashlib.blake2b(digest_size=8)
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def payload_spec(h: list[int]) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """The shapes and dtypes of the tensors that follow header ``h``."""
    kind = h[0]
    if kind == REQUEST:
        return [((h[2],), torch.int64)]
    if kind == KV:
        P, dt, L, K, H = h[2], h[5], h[6], h[7], h[8]
        return [((P, K, H), TORCH_DTYPES[DTYPES[dt]])] * (2 * L)
    if kind == DONE:
        return [((h[2],), torch.int64)]
    return []


def _posted(work: Any) -> Any:
    assert work is not None, "isend/irecv in a group this rank belongs to returns a Work"
    return work


class Outbox:
    """Non-blocking sends: `send` queues a message and returns; a thread per destination posts its
    ``isend``s and waits for them with a timeout, so a slow peer delays no one else. A destination whose
    send fails (the peer died) or times out (it stopped answering) is reported once by `failures`."""

    def __init__(self, timeout: float, device: torch.device | None = None) -> None:
        self.timeout, self.device = timeout, device or torch.device("cpu")
        self.queues: dict[int, queue.Queue] = {}
        self.failed: set[int] = set()
        self._reported: set[int] = set()

    def send(self, dst: int, tensors: list[torch.Tensor]) -> None:
        if dst in self.failed:
            return
        if dst not in self.queues:
            self.queues[dst] = queue.Queue()
            threading.Thread(target=self._run, args=(dst,), daemon=True).start()
        self.queues[dst].put([t.to(self.device) for t in tensors])

    def _run(self, dst: int) -> None:
        q = self.queues[dst]
        while True:
            tensors = q.get()
            try:
                works = [_posted(dist.isend(t, dst)) for t in tensors]
                for w in works:
                    w.wait(datetime.timedelta(seconds=self.timeout))
            except Exception:  # gloo raises RuntimeError subclasses: peer closed, timed out
                self.failed.add(dst)
                return
            finally:
                q.task_done()

    def failures(self) -> set[int]:
        new = self.failed - self._reported
        self._reported |= new
        return new

    def drain(self, timeout: float) -> None:
        """Wait until every send to a live destination completed, at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(q.unfinished_tasks == 0 for d, q in self.queues.items() if d not in self.failed):
                return
            time.sleep(0.001)


class Inbox:
    """A receiving thread per source: each takes a header, then the payload it announces (with a
    timeout), and queues ``(src, header, payload, arrival time)``; a source whose connection fails or
    whose payload times out queues ``(src, None, [], reason)`` and stops."""

    def __init__(self, sources: list[int], timeout: float, device: torch.device | None = None) -> None:
        self.timeout, self.device = timeout, device or torch.device("cpu")
        self.queue: queue.Queue = queue.Queue()
        self.dropped: set[int] = set()
        for src in sources:
            threading.Thread(target=self._run, args=(src,), daemon=True).start()

    def _run(self, src: int) -> None:
        while src not in self.dropped:
            try:
                buf = torch.zeros(HEADER, dtype=torch.int64, device=self.device)
                _posted(dist.irecv(buf, src)).wait()  # idle peers are fine: the group's timeout is long
                h = buf.cpu().tolist()
                payload = [torch.empty(s, dtype=d, device=self.device) for s, d in payload_spec(h)]
                works = [_posted(dist.irecv(b, src)) for b in payload]
                for w in works:
                    w.wait(datetime.timedelta(seconds=self.timeout))
            except Exception as exc:  # peer closed or payload timed out
                self.queue.put((src, None, [], f"{type(exc).__name__}: {str(exc)[:200]}"))
                return
            if src not in self.dropped:
                self.queue.put((src, h, payload, time.time()))
            if h[0] == STOP:
                return

    def drop(self, src: int) -> None:
        """Ignore ``src`` from now on (its thread may stay blocked; it is a daemon)."""
        self.dropped.add(src)

    def get(self, timeout: float) -> tuple[int, list[int] | None, list[torch.Tensor], Any] | None:
        try:
            item = self.queue.get(timeout=timeout)
        except queue.Empty:
            return None
        return None if item[0] in self.dropped and item[1] is not None else item
