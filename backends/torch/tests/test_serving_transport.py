"""The ``torch.distributed`` transport of `tensorglot.serving`: messages arrive whole and in order, two
ranks sending to each other do not deadlock, a dead peer and a payload that never comes are reported.

Two spawned ranks over gloo on a free port; every test has a timeout. The serving runs themselves
(tokens equal `generate` through this transport) are in tests/test_serving.py.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback

import numpy as np
import pytest

pytest.importorskip("torch", reason="the transport is torch.distributed")

from tensorglot.registry import registry
from tensorglot.serving import transport as tr
from tensorglot.serving.launch import free_port

TIMEOUT_S = 3.0


def _spec(h: list[int]) -> list[tuple[tuple[int, ...], str]]:
    # kind 1: one (n,) int64 array; kind 2: a (2, n) float32 and a (n,) float16; kind 3: one (n,) int64
    # array (which the "short" sender never sends); others: no payload
    n = h[2]
    return {1: [((n,), "int64")], 2: [((2, n), "float32"), ((n,), "float16")], 3: [((n,), "int64")]}.get(h[0], [])


def _arrays(n: int) -> list[np.ndarray]:
    return [np.arange(2 * n, dtype=np.float32).reshape(2, n) / 7, np.linspace(-1, 1, n).astype(np.float16)]


def _rank(rank: int, port: int, scenario: str, out) -> None:
    try:
        t = (
            registry()
            .transports()["torch"]
            .factory(rank, 2, address=f"tcp://127.0.0.1:{port}", timeout_s=TIMEOUT_S, payload_spec=_spec)
        )
        t.barrier()
        t.listen([1 - rank])
        other = 1 - rank
        if scenario == "exchange":  # both send before either receives
            for n in (3, 5):
                t.send(other, tr.header(1, rank, n), [np.arange(n, dtype=np.int64) + 10 * rank])
                t.send(other, tr.header(2, rank, n), _arrays(n))
            got = [t.recv(30.0) for _ in range(4)]
            t.send(other, tr.header(9))  # a last message, so neither leaves before the other has read
            t.recv(30.0)
            out.put(("got", rank, [(m.src, m.header[:3], m.payload) for m in got]))
        elif scenario == "dies":
            if rank == 1:
                os._exit(3)
            msg = t.recv(30.0)
            t.send(1, tr.header(9))
            failed: set[int] = set()
            deadline = time.monotonic() + 30
            while not failed and time.monotonic() < deadline:
                failed |= t.failures()
                time.sleep(0.05)
            out.put(("got", rank, (msg.header, msg.error, failed, t.failures())))
        elif scenario == "short":
            if rank == 1:
                t.send(0, tr.header(3, 1, 4))  # kind 3 announces a payload, which never comes
                t.recv(30.0)  # alive: rank 0's receive times out, its connection does not close
            else:
                start = time.monotonic()
                msg = t.recv(30.0)
                out.put(("got", rank, (msg.header, msg.error, time.monotonic() - start)))
                t.send(1, tr.header(9))
    except BaseException:
        out.put(("error", rank, traceback.format_exc()))
    out.close()
    out.join_thread()
    os._exit(0)


def _run(scenario: str, timeout: float = 120) -> dict[int, object]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, scenario, out), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    try:
        expected = 2 if scenario == "exchange" else 1  # otherwise only rank 0 reports
        while len(results) < expected:
            kind, rank, payload = out.get(timeout=timeout)
            if kind == "error":
                raise AssertionError(f"rank {rank} failed:\n{payload}")
            results[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return results


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_messages_arrive_whole_and_in_order_while_both_ranks_send():
    results = _run("exchange")
    for rank in (0, 1):
        other = 1 - rank
        got = results[rank]
        assert [(src, h) for src, h, _ in got] == [(other, [1, other, 3]), (other, [2, other, 3]),
                                                   (other, [1, other, 5]), (other, [2, other, 5])]  # fmt: skip
        for (_, h, payload), n in zip(got, (3, 3, 5, 5)):
            want = [np.arange(n, dtype=np.int64) + 10 * other] if h[0] == 1 else _arrays(n)
            assert len(payload) == len(want)
            for a, b in zip(payload, want):
                assert a.dtype == b.dtype and np.array_equal(a, b)


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_a_dead_peer_is_an_error_message_and_a_failed_destination():
    header, error, failed, again = _run("dies")[0]
    assert header is None and error
    assert failed == {1} and again == set()  # reported once


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_a_payload_that_never_comes_times_out():
    header, error, waited = _run("short")[0]
    assert header is None and error
    assert TIMEOUT_S <= waited < 30


def test_the_plugin_registers_the_transport_lazily():
    info = registry().transports()["torch"]
    assert info.plugin == "torch = tensorglot_torch.plugin"
    assert info.factory.__module__ == "tensorglot_torch.plugin"  # torch loads when a rank calls it
