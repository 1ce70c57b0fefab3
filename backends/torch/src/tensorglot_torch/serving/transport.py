"""The ``torch.distributed`` transport of `tensorglot.serving` (see its `Transport` protocol).

gloo on CPU; NCCL when CUDA gives every rank its own device. Sends go through a thread per
destination that posts the ``isend``s of a message (the header, then each array) and waits for them
with a timeout, so a slow peer delays no one else; receives through a thread per source that takes a
header, then exactly the payload it announces. Pitfalls met on the way:
  * gloo's ``Work.is_completed()`` stays False until ``wait()`` is called, so polling it cannot work;
    blocking waits on threads can.
  * Messages from one source match receives in posting order: a header ``irecv`` posted before the
    previous payload's receives would swallow the payload, hence one thread per source.
  * The group's own timeout is long (an idle worker waits for work); every payload has its own.
  * Those are not gloo's timeouts: a gloo wait that times out closes *every* pair of the rank
    ("Application timeout caused pair closure"), so one frozen peer would cut this rank off from all
    the others. Waits are untimed; a watchdog reports a transfer past its deadline (an error
    `Message`, or the destination in `failures`) and leaves its thread blocked on the dead peer.
NumPy arrays travel through ``torch.from_numpy`` (no copy on CPU).
"""

from __future__ import annotations

import datetime
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from tensorglot.serving.transport import HEADER, Message, PayloadSpec


def _posted(work: Any) -> Any:
    assert work is not None, "isend/irecv in a group this rank belongs to returns a Work"
    return work


class TorchTransport:
    def __init__(self, rank: int, world_size: int, *, address: str, timeout_s: float, payload_spec: PayloadSpec):
        self.rank, self.world_size, self.timeout_s, self.payload_spec = rank, world_size, timeout_s, payload_spec
        nccl = torch.cuda.is_available() and torch.cuda.device_count() >= world_size and dist.is_nccl_available()
        self.device = torch.device("cuda", rank) if nccl else torch.device("cpu")
        if nccl:
            torch.cuda.set_device(self.device)
        dist.init_process_group(
            "nccl" if nccl else "gloo",
            init_method=address,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(hours=1),  # idle receives wait on it; transfers have their own
        )
        self._outboxes: dict[int, queue.Queue] = {}
        self._failed: set[int] = set()
        self._reported: set[int] = set()
        self._inbox: queue.Queue = queue.Queue()
        self._dropped: set[int] = set()
        self._lock = threading.Lock()
        # peer -> monotonic deadline of the transfer in progress with it, for the watchdog
        self._recv_due: dict[int, float] = {}
        self._send_due: dict[int, float] = {}
        self._late: set[int] = set()  # sources whose payload missed its deadline (reported once)
        threading.Thread(target=self._watch, daemon=True, name="transport-watchdog").start()

    def _watch(self) -> None:
        while True:
            time.sleep(min(0.05, self.timeout_s / 10))
            now = time.monotonic()
            with self._lock:
                for dst, due in list(self._send_due.items()):
                    if now > due:
                        del self._send_due[dst]
                        self._failed.add(dst)
                for src, due in list(self._recv_due.items()):
                    if now > due:
                        del self._recv_due[src]
                        self._late.add(src)
                        why = f"TimeoutError: its payload did not arrive within {self.timeout_s:g} s"
                        self._inbox.put(Message(src, None, [], time.time(), why))

    # -- sending -----------------------------------------------------------------------------------
    def send(self, dst: int, header: np.ndarray, arrays: Sequence[np.ndarray] = (), /) -> None:
        if dst in self._failed:
            return
        tensors = [torch.from_numpy(np.ascontiguousarray(a)).to(self.device) for a in (header, *arrays)]
        with self._lock:  # the heartbeat sends from its own thread: one outbox and one thread per dst
            if dst not in self._outboxes:
                self._outboxes[dst] = queue.Queue()
                threading.Thread(target=self._send_loop, args=(dst,), daemon=True).start()
            self._outboxes[dst].put(tensors)

    def _send_loop(self, dst: int) -> None:
        q = self._outboxes[dst]
        while True:
            tensors = q.get()
            try:
                with self._lock:
                    self._send_due[dst] = time.monotonic() + self.timeout_s
                works = [_posted(dist.isend(t, dst)) for t in tensors]
                for w in works:
                    w.wait()  # untimed (see the module's note); the watchdog marks it failed when late
                with self._lock:
                    self._send_due.pop(dst, None)
            except Exception:  # gloo raises RuntimeError subclasses: peer closed
                self._failed.add(dst)
                return
            finally:
                q.task_done()

    def failures(self) -> set[int]:
        new = self._failed - self._reported
        self._reported |= new
        return new

    def drain(self, timeout: float, /) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(q.unfinished_tasks == 0 for d, q in list(self._outboxes.items()) if d not in self._failed):
                return
            time.sleep(0.001)

    # -- receiving ---------------------------------------------------------------------------------
    def listen(self, sources: Sequence[int], /) -> None:
        for src in sources:
            threading.Thread(target=self._recv_loop, args=(src,), daemon=True).start()

    def _recv_loop(self, src: int) -> None:
        while src not in self._dropped:
            try:
                buf = torch.zeros(HEADER, dtype=torch.int64, device=self.device)
                _posted(dist.irecv(buf, src)).wait()  # idle peers are fine: the group's timeout is long
                h = buf.cpu().tolist()
                spec = self.payload_spec(h)
                payload = [torch.empty(s, dtype=getattr(torch, d), device=self.device) for s, d in spec]
                with self._lock:
                    self._recv_due[src] = time.monotonic() + self.timeout_s
                works = [_posted(dist.irecv(b, src)) for b in payload]
                for w in works:
                    w.wait()  # untimed (see the module's note); the watchdog reports it when late
            except Exception as exc:  # peer closed
                with self._lock:
                    self._recv_due.pop(src, None)
                    if src not in self._late:
                        why = f"{type(exc).__name__}: {str(exc)[:200]}"
                        self._inbox.put(Message(src, None, [], time.time(), why))
                return
            with self._lock:
                self._recv_due.pop(src, None)
                if src in self._late:  # already reported as failed: nothing more comes from it
                    return
            if src not in self._dropped:
                self._inbox.put(Message(src, h, [b.cpu().numpy() for b in payload], time.time()))

    def recv(self, timeout: float, /) -> Message | None:
        try:
            msg = self._inbox.get(timeout=timeout) if timeout > 0 else self._inbox.get_nowait()
        except queue.Empty:
            return None
        return None if msg.src in self._dropped and msg.header is not None else msg

    def drop(self, src: int, /) -> None:
        self._dropped.add(src)  # its thread may stay blocked; it is a daemon

    def barrier(self) -> None:
        dist.barrier()
