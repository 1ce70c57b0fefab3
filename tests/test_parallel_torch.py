"""torch.distributed strategies: real processes, failures that stop every rank, torchrun unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from tensorglot import parallel as P

torch = pytest.importorskip("torch")
tp_ = pytest.importorskip("tensorglot_torch.parallel")
launch = pytest.importorskip("tensorglot_torch.launch")

pytestmark = pytest.mark.distributed
SHAPE = P.MLPShape(layers=2, batch=8, d_model=4, d_ff=8)


def _inputs():
    params, x, dy = P.init_mlp(SHAPE, seed=3)
    return {k: v.astype(np.float32) for k, v in params.items()}, x.astype(np.float32), dy.astype(np.float32)


def _alive(n: int) -> list[int]:
    pool = launch._POOLS.get(n)
    return [p.pid for p in pool.procs if p.is_alive()] if pool else []


@pytest.mark.timeout(180)
def test_a_failing_rank_stops_every_rank_with_its_error(monkeypatch):
    params, x, dy = _inputs()
    tp_.step(params, x, dy, strategy="tp", world_size=2)  # the ranks are up
    procs = list(launch._POOLS[2].procs)
    monkeypatch.setenv(tp_.FAIL_RANK_ENV, "1")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 1 of 2 failed: RuntimeError: injected failure on rank 1"):
        tp_.step(params, x, dy, strategy="tp", world_size=2, timeout=60)
    assert time.monotonic() - start < 60
    assert not any(p.is_alive() for p in procs), "rank 0 was left waiting in its all-reduce"
    monkeypatch.delenv(tp_.FAIL_RANK_ENV)
    again = tp_.step(params, x, dy, strategy="tp", world_size=2)  # a fresh set of ranks
    assert again.bytes_per_device == P.step_cost("tp", SHAPE, 2).bytes_per_device


@pytest.mark.timeout(180)
def test_a_hanging_rank_is_killed_at_the_timeout(monkeypatch):
    params, x, dy = _inputs()
    tp_.step(params, x, dy, strategy="tp", world_size=2)
    procs = list(launch._POOLS[2].procs)
    monkeypatch.setenv(tp_.FAIL_RANK_ENV, "0:hang")
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish in 5 s"):
        tp_.step(params, x, dy, strategy="tp", world_size=2, timeout=5)
    assert 5 <= time.monotonic() - start < 30
    assert not any(p.is_alive() for p in procs)


@pytest.mark.timeout(60)
def test_bad_input_raises_before_any_process_starts():
    params, x, dy = _inputs()
    tp_.shutdown()
    with pytest.raises(ValueError, match="dp needs batch = 8 divisible by world_size = 3"):
        tp_.step(params, x, dy, strategy="dp", world_size=3)
    with pytest.raises(ValueError, match="pp needs batch = 8 divisible by microbatches = 3"):
        tp_.step(params, x, dy, strategy="pp", world_size=2, microbatches=3)
    assert launch._POOLS == {}


@pytest.mark.timeout(180)
def test_measured_bytes_come_from_each_collectives_tensor():
    params, x, dy = _inputs()
    got = tp_.step(params, x, dy, strategy="fsdp", world_size=2)
    # layer 1 backward: gather w_out (8·4·4 = 128 bytes), reduce-scatter its grad, gather w_in, reduce-scatter
    assert [(c.kind, c.size_bytes, c.group_size) for c in got.collectives[4:8]] == [
        ("all_gather", 128, 2), ("reduce_scatter", 128, 2), ("all_gather", 128, 2), ("reduce_scatter", 128, 2)
    ]  # fmt: skip
    assert got.param_bytes_per_rank == SHAPE.param_bytes // 2


def _python_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # the same packages in the children
    return env


def _rows(stdout: str) -> list[dict]:
    """The JSON list `tensorglot parallel --json` prints (after anything else on stdout)."""
    return json.loads(stdout[stdout.index("[\n") :])


@pytest.mark.timeout(240)
def test_runs_unchanged_under_torchrun():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "tensorglot_torch.parallel", "--strategy", "fsdp", "--layers", "2", "--batch", "8", "--d-model", "4"]
    cmd += ["--d-ff", "8", "--repeats", "1", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=200, env=_python_env(), check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    [row] = _rows(out.stdout)  # rank 0 prints, rank 1 does not
    assert row["strategy"] == "fsdp" and row["world_size"] == 2
    assert (
        row["bytes_per_device_measured"]
        == row["bytes_per_device_model"]
        == P.step_cost("fsdp", SHAPE, 2).bytes_per_device
    )
    assert row["max_abs_error"] < 1e-5


@pytest.mark.timeout(240)
def test_module_launches_its_own_ranks_without_torchrun():
    cmd = [sys.executable, "-m", "tensorglot_torch.parallel", "--strategy", "pp", "--world-size", "2"]
    cmd += ["--layers", "2", "--batch", "8", "--microbatches", "4", "--repeats", "1", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=200, env=_python_env(), check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    [row] = _rows(out.stdout)
    assert row["world_size"] == 2 and row["bytes_per_device_measured"] == row["bytes_per_device_model"]
