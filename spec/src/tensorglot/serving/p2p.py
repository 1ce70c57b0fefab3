"""A `Transport` over any library's point-to-point ``isend``/``irecv`` (torch.distributed's today): the
threads, deadlines and bookkeeping, written once; a subclass supplies the posts and the conversions.

Sends go through a thread per destination that posts the sends of a message (the header, then each
array) and waits for them, so a slow peer delays no one else; receives through a thread per source that
takes a header, then exactly the payload it announces (`PayloadSpec`). Pitfalls met on the way (gloo):
  * ``Work.is_completed()`` stays False until ``wait()`` is called, so polling it cannot work;
    blocking waits on threads can.
  * Messages from one source match receives in posting order: a header receive posted before the
    previous payload's receives would swallow the payload, hence one thread per source.
  * The group's own timeout is long (an idle worker waits for work); every transfer has its own, and it
    is not the library's: a gloo wait that times out closes *every* pair of the rank ("Application
    timeout caused pair closure"), so one frozen peer would cut this rank off from all the others.
    Waits are untimed; a watchdog reports a transfer past its deadline (an error `Message`, or the
    destination in `failures`) and leaves its thread blocked on the dead peer.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from .transport import HEADER, Message, PayloadSpec


class Posted(Protocol):
    """A posted send or receive (a torch ``Work``): ``wait`` blocks until it is done, or raises."""

    def wait(self) -> Any: ...


class PointToPointTransport:
    """`Transport` over point-to-point messages; subclasses define `_native`, `_isend`, `_irecv`,
    `_host` and `barrier`."""

    def __init__(self, rank: int, world_size: int, *, timeout_s: float, payload_spec: PayloadSpec) -> None:
        self.rank, self.world_size, self.timeout_s, self.payload_spec = rank, world_size, timeout_s, payload_spec
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

    # -- what a library supplies ---------------------------------------------------------------------
    def _native(self, a: np.ndarray, /) -> Any:
        """``a`` (contiguous) as the library's array, on this rank's device."""
        raise NotImplementedError

    def _isend(self, x: Any, dst: int, /) -> Posted:
        raise NotImplementedError

    def _irecv(self, src: int, shape: tuple[int, ...], dtype: str, /) -> tuple[Any, Posted]:
        """(a new buffer of ``shape`` and ``dtype``, its posted receive from ``src``)."""
        raise NotImplementedError

    def _host(self, buf: Any, /) -> np.ndarray:
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    # -- the watchdog --------------------------------------------------------------------------------
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

    # -- sending -------------------------------------------------------------------------------------
    def send(self, dst: int, header: np.ndarray, arrays: Sequence[np.ndarray] = (), /) -> None:
        if dst in self._failed:
            return
        items = [self._native(np.ascontiguousarray(a)) for a in (header, *arrays)]
        with self._lock:  # the heartbeat sends from its own thread: one outbox and one thread per dst
            if dst not in self._outboxes:
                self._outboxes[dst] = queue.Queue()
                threading.Thread(target=self._send_loop, args=(dst,), daemon=True).start()
            self._outboxes[dst].put(items)

    def _send_loop(self, dst: int) -> None:
        q = self._outboxes[dst]
        while True:
            items = q.get()
            try:
                with self._lock:
                    self._send_due[dst] = time.monotonic() + self.timeout_s
                posted = [self._isend(x, dst) for x in items]
                for w in posted:
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

    # -- receiving -----------------------------------------------------------------------------------
    def listen(self, sources: Sequence[int], /) -> None:
        for src in sources:
            threading.Thread(target=self._recv_loop, args=(src,), daemon=True).start()

    def _recv_loop(self, src: int) -> None:
        while src not in self._dropped:
            try:
                buf, work = self._irecv(src, (HEADER,), "int64")
                work.wait()  # idle peers are fine: the group's timeout is long
                h = [int(v) for v in self._host(buf)]
                with self._lock:
                    self._recv_due[src] = time.monotonic() + self.timeout_s
                posted = [self._irecv(src, s, d) for s, d in self.payload_spec(h)]
                for _, w in posted:
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
                self._inbox.put(Message(src, h, [self._host(b) for b, _ in posted], time.time()))

    def recv(self, timeout: float, /) -> Message | None:
        try:
            msg = self._inbox.get(timeout=timeout) if timeout > 0 else self._inbox.get_nowait()
        except queue.Empty:
            return None
        return None if msg.src in self._dropped and msg.header is not None else msg

    def drop(self, src: int, /) -> None:
        self._dropped.add(src)  # its thread may stay blocked; it is a daemon
