"""The NumPy simulated mesh and the ``tensorglot parallel`` command on it."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from tensorglot import parallel as P
from tensorglot.cli import main
from tensorglot_numpy.parallel import Mesh, single_step, step


def test_mesh_collectives_are_array_ops_that_log_what_each_rank_sends():
    mesh = Mesh(2)
    mine = [np.ones(4, np.float32), np.full(4, 2.0, np.float32)]

    def program(comm):
        total = comm.all_reduce(mine[comm.rank], tensor="g")
        gathered = comm.all_gather(mine[comm.rank], tensor="w")
        shard = comm.reduce_scatter(np.arange(4.0, dtype=np.float32), tensor="dw")
        return total.tolist(), gathered.tolist(), shard.tolist()

    got = mesh.run(program)
    assert [g[0] for g in got] == [[3.0] * 4] * 2
    assert got[1][1] == [1.0] * 4 + [2.0] * 4
    assert [g[2] for g in got] == [[0.0, 2.0], [4.0, 6.0]]
    # 16-byte all-reduce over 2: 16 sent; 32-byte all-gather: 16; 16-byte reduce-scatter: 8
    assert [(c.kind, c.size_bytes, c.bytes_per_device) for c in mesh.log[0]] == [
        ("all_reduce", 16, 16),
        ("all_gather", 32, 16),
        ("reduce_scatter", 16, 8),
    ]
    assert mesh.log[0] == mesh.log[1]


def test_dp_tp_groups_reduce_only_inside_their_row_or_column():
    def program(comm):
        x = np.full(1, float(comm.rank))
        rows = comm.all_reduce(x, tensor="act", groups=[[0, 1], [2, 3]])
        cols = comm.all_reduce(x, tensor="grad", groups=[[0, 2], [1, 3]])
        return float(rows[0]), float(cols[0])

    got = Mesh(4).run(program)
    assert [r for r, _ in got] == [1.0, 1.0, 5.0, 5.0]
    assert [c for _, c in got] == [2.0, 4.0, 2.0, 4.0]


def test_a_send_arrives_at_its_receiver_and_only_the_sender_logs_it():
    def program(comm):
        if comm.rank == 0:
            comm.send(np.arange(3.0), dst=1, tensor="act")
            return None
        return comm.recv(np.empty(3), src=0).tolist()

    mesh = Mesh(2)
    assert mesh.run(program) == [None, [0.0, 1.0, 2.0]]
    assert [(c.kind, c.size_bytes) for c in mesh.log[0]] == [("send", 24)]
    assert mesh.log[1] == []


def test_a_failing_rank_raises_its_error_and_frees_the_rank_waiting_for_it():
    def program(comm):
        if comm.rank == 1:
            raise RuntimeError("rank 1 broke")
        return comm.all_reduce(np.ones(2), tensor="g")

    start = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 broke"):
        Mesh(2, timeout=30).run(program)
    assert time.monotonic() - start < 10  # not the barrier's 30 s


def test_a_rank_that_never_arrives_is_a_timeout_naming_the_step():
    def program(comm):
        if comm.rank == 0:
            return comm.recv(np.empty(2), src=1)  # rank 1 never sends
        time.sleep(3)
        return None

    with pytest.raises(TimeoutError, match=r"parallel: pp on 2 simulated ranks did not finish in 0\.5 s"):
        Mesh(2, timeout=0.5).run(program, what="parallel: pp")


def test_a_step_with_lr_zero_leaves_params_and_gradients_match_the_one_device_step():
    shape = P.MLPShape(layers=2, batch=8, d_model=4, d_ff=8, dtype="float64")
    params, x, dy = P.init_mlp(shape, seed=1)
    one = single_step(params, x, dy, lr=0.0)
    for strategy in P.STRATEGIES:
        got = step(params, x, dy, strategy=strategy, world_size=2, lr=0.0, microbatches=2)
        for k in params:
            np.testing.assert_array_equal(got.params[k], params[k])
            np.testing.assert_allclose(got.grads[k], one.grads[k], rtol=1e-12, atol=1e-14)


def test_cli_json_has_the_issue_keys_and_measured_equals_model(capsys):
    assert main(["parallel", "--backend", "numpy", "--strategy", "all", "--world-size", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["strategy"] for r in rows] == list(P.STRATEGIES)
    for r in rows:
        assert {
            "strategy",
            "world_size",
            "max_abs_error",
            "bytes_per_device_measured",
            "bytes_per_device_model",
            "param_bytes_per_rank",
            "seconds_per_step",
        } <= set(r)
        assert r["world_size"] == 2
        assert r["bytes_per_device_measured"] == r["bytes_per_device_model"] > 0
        assert r["max_abs_error"] < 1e-4  # float32 against the float32 one-device step


def test_cli_table_prints_a_row_per_strategy(capsys):
    args = ["parallel", "--backend", "numpy", "--strategy", "pp", "--world-size", "4", "--schedule", "gpipe"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "4 devices" in out and "gpipe" in out
    assert out.splitlines()[2].startswith("pp ")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--strategy", "tp", "--world-size", "3"], "tp needs d_ff = 256 divisible by world_size = 3"),
        (["--strategy", "pp", "--microbatches", "5"], "pp needs batch = 32 divisible by microbatches = 5"),
        (["--strategy", "zero3"], "unknown strategy 'zero3'"),
    ],
)
def test_cli_bad_input_is_a_clear_error(capsys, args, message):
    assert main(["parallel", "--backend", "numpy", *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("timeout", [0, -1.0, float("inf"), float("nan"), True])
def test_a_timeout_that_cannot_be_honoured_is_refused(timeout):
    params, x, dy = P.init_mlp(P.MLPShape(layers=2, batch=4, d_model=4, d_ff=8))
    with pytest.raises(ValueError, match=f"parallel: timeout must be a positive number of seconds, got {timeout!r}"):
        step(params, x, dy, strategy="dp", world_size=2, timeout=timeout)
    with pytest.raises(ValueError, match=f"Mesh: timeout must be a positive number of seconds, got {timeout!r}"):
        Mesh(2, timeout=timeout)
    with pytest.raises(ValueError, match="Mesh: n must be a positive int, got 0"):
        Mesh(0)
