"""Fault injection for torch's parallel launcher: a rank killed during start-up, a port taken, a rank
that stops answering, a timeout of 0. Each run is a fresh interpreter with a deadline, because the
failure under test is a process that never exits (Python's exit waiting on a queue's feeder thread
that writes to a dead rank)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("torch", reason="the launcher under test starts torch.distributed ranks")
pytestmark = pytest.mark.distributed

# Large enough (8 MiB of parameters) that the steps' arrays overflow a pipe's buffer, so a rank that
# never reads its queue blocks the parent's feeder thread, as it did at the default shape.
STEP = """
import numpy as np
from tensorglot import parallel as P
import tensorglot_torch.launch as launch
import tensorglot_torch.parallel as tp
shape = P.MLPShape(layers=4, batch=32, d_model=128, d_ff=1024)
params, x, dy = P.init_mlp(shape)
params = {k: v.astype(np.float32) for k, v in params.items()}
x, dy = x.astype(np.float32), dy.astype(np.float32)

def step(timeout=60):
    return tp.step(params, x, dy, strategy="dp", world_size=2, timeout=timeout)

def report(error, timeout=60):
    try:
        step(timeout)
    except error as exc:
        print("raised:", exc)
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TENSORGLOT_", "RANK", "WORLD_SIZE"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env.update(dict.fromkeys(("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"), "1"))
    return {**env, **extra}


def _run(argv: list[str], deadline: float, **env: str) -> subprocess.CompletedProcess:
    """Run ``argv``; a process still alive at ``deadline`` seconds fails the test (it would hang CI)."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=deadline, env=_env(**env), check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{argv[:4]} was still running after {deadline} s:\n{exc.stdout!r}\n{exc.stderr!r}")
    return out


def _python(code: str, deadline: float, **env: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-c", STEP + code], deadline, **env)


@pytest.mark.timeout(120)
def test_a_rank_killed_during_start_up_fails_the_step_and_the_process_exits():
    code = """
import multiprocessing as mp, os, signal, threading, time

def kill_rank_1():
    while True:
        ranks = sorted(mp.active_children(), key=lambda p: p.name)
        if len(ranks) == 2 and ranks[1].pid:
            os.kill(ranks[1].pid, signal.SIGKILL)
            return
        time.sleep(0.005)

threading.Thread(target=kill_rank_1, daemon=True).start()
report(RuntimeError)
"""
    out = _python(code, deadline=90)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "raised: parallel: rank 1 of 2 died with exit code -9" in out.stdout


@pytest.mark.timeout(150)
def test_a_taken_port_is_retried_on_another_and_too_many_fail_cleanly():
    code = """
import socket
from tensorglot.parallel import devices
from tensorglot.parallel.devices import free_port
taken = socket.socket()
taken.bind(("127.0.0.1", 0))
taken.listen()
port = taken.getsockname()[1]
chosen = []

def first_taken():
    chosen.append(port if not chosen else free_port())
    return chosen[-1]

devices.free_port = first_taken  # what the spec's RankPool calls
r = step()
print("ok", chosen[0] == port, len(chosen), r.bytes_per_device == P.step_cost("dp", shape, 2).bytes_per_device)
tp.shutdown()
devices.free_port = lambda: port
devices.PORT_ATTEMPTS = 2  # each attempt starts two interpreters: keep the test short
report(RuntimeError)
"""
    out = _python(code, deadline=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ok True 2 True" in out.stdout, out.stdout + out.stderr[-2000:]
    assert "raised: parallel: dp (starting the ranks): 2 ports were taken" in out.stdout
    assert "EADDRINUSE" in out.stdout


@pytest.mark.timeout(60)
def test_timeout_zero_is_refused_at_once_in_one_line():
    argv = [sys.executable, "-m", "tensorglot.cli", "parallel", "--backend", "torch", "--strategy", "dp"]
    out = _run([*argv, "--timeout", "0"], deadline=45)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "tensorglot parallel: error: argument --timeout: wanted a positive, finite number of seconds, got '0' "
        "(see tensorglot parallel --help)"
    ]


@pytest.mark.timeout(120)
def test_a_rank_that_stops_answering_is_killed_at_the_timeout_and_the_process_exits():
    # The deadline passes while the ranks start or while rank 1 sleeps in its first all-reduce: either
    # way the ranks may never have read the step's arrays from their queues.
    out = _python("report(TimeoutError, timeout=1)", deadline=90, TENSORGLOT_PARALLEL_FAIL_RANK="1:hang")
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"raised: parallel: dp( \(starting the ranks\))? on 2 ranks did not finish in 1 s", out.stdout)
