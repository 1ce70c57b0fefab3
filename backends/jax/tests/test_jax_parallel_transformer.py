"""The transformer's parallel training step on JAX (the spec's rank program in `jax.shard_map` over a Mesh
of host devices): every strategy computes the one-device `value_and_grad` and update (float32 against
the float64 NumPy reference; float64 at rtol 1e-10 under JAX_ENABLE_X64=1), and the compiled module
sends exactly the bytes `transformer_cost` says.

Each strategy is one XLA compile (seconds on a loaded CPU), so the default run takes the strategies the
JAX runtime must have; TENSORGLOT_JAX_ALL_STRATEGIES=1 adds the compositions, one kv head shared by
several tp ranks, cp on 4 devices, more pipeline schedules and shapes, and the CLI.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import tensorglot
from tensorglot import parallel as P
from tensorglot.parallel.transformer_optim import Optimizer, one_device_steps

jax = pytest.importorskip("jax")

pytestmark = pytest.mark.distributed

be = tensorglot.get_backend("jax")
ref = tensorglot.get_backend("numpy")
B, S = 4, 8
ALL = os.environ.get("TENSORGLOT_JAX_ALL_STRATEGIES") == "1"
X64 = bool(jax.config.read("jax_enable_x64"))
DTYPE = "float64" if X64 else "float32"
RTOL = 1e-10 if X64 else 1e-4  # gradients and updates; float32 also has atol 1e-5 of each array's largest entry
slow = pytest.mark.skipif(not ALL, reason="one XLA compile each: set TENSORGLOT_JAX_ALL_STRATEGIES=1")

GQA = tensorglot.TransformerConfig(
    vocab_size=16, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4, d_ff=32, max_seq_len=S
)
MQA_TIED = tensorglot.TransformerConfig(
    vocab_size=16, d_model=16, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=4, d_ff=32, max_seq_len=S,
    activation="gelu", tie_embeddings=True,
)  # fmt: skip
RUNS = [("dp", 2, "sgd"), ("zero1", 2, "adamw"), ("zero2", 4, "adamw"), ("fsdp", 4, "adamw"), ("tp", 2, "sgd")]
RUNS += [("tp_sp", 2, "adamw"), ("cp", 2, "sgd")]
CASES = [pytest.param(GQA, s, n, o, id=f"{s}-{n}-{o}") for s, n, o in RUNS]
CASES += [
    pytest.param(c, s, n, o, id=f"{s}-{n}-{o}-{c.activation}", marks=slow)
    for c, s, n, o in [
        (MQA_TIED, "tp", 4, "sgd"),
        (MQA_TIED, "cp", 4, "adamw"),
        (GQA, "dp_tp", 4, "sgd"),
        (GQA, "fsdp_tp", 4, "adamw"),
        (MQA_TIED, "fsdp_tp", 4, "sgd"),
    ]
]
# AdamW's first steps move each weight by about lr·g/(|g| + eps): with eps ≪ float32's error in a tiny
# gradient the sign of that error decides the step, so the float32 step is compared at an eps it resolves.
ADAMW = Optimizer("adamw", lr=1e-2, eps=1e-3, weight_decay=0.1)


@pytest.fixture(autouse=True)
def _devices():
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 JAX devices: XLA_FLAGS=--xla_force_host_platform_device_count=4 before JAX starts")


def _inputs(config, seed=0):
    params = tensorglot.init_params(config, seed=seed, dtype=DTYPE)
    rng = np.random.default_rng(seed)
    return params, rng.integers(0, config.vocab_size, (B, S)), rng.integers(0, config.vocab_size, (B, S))


def _one_device(params, config, tokens, targets, opt, steps):
    """`steps` steps in float64 on NumPy (`one_device_steps`), from the same (rounded) parameters."""
    params = {k: v.astype(np.float64) for k, v in params.items()}
    return one_device_steps(ref.layers, params, config, tokens, targets, opt, steps)


def _close(got, want, what):
    for k in want:
        scale = float(np.max(np.abs(want[k]))) or 1.0
        atol = 1e-14 if X64 else 1e-5 * scale
        np.testing.assert_allclose(got[k], want[k], rtol=RTOL, atol=atol, err_msg=f"{what} {k}")


def _memory(r):
    return r.param_bytes_per_rank, r.grad_bytes_per_rank, r.optimizer_bytes_per_rank


def _step_against_one_device(config, strategy, n, optimizer, **options):
    """(the JAX step, its `transformer_cost`) once its loss, gradients and update equal one device's."""
    params, tokens, targets = _inputs(config)
    opt = ADAMW if optimizer == "adamw" else Optimizer("sgd", 0.1)
    got = be.parallel.transformer_step(
        params, config, tokens, targets, strategy=strategy, world_size=n, optimizer=optimizer, lr=opt.lr,
        eps=opt.eps, weight_decay=opt.weight_decay, timeout=120, **options,
    )  # fmt: skip
    (loss,), grads, updated = _one_device(params, config, tokens, targets, opt, 1)
    np.testing.assert_allclose(got.loss, loss, rtol=RTOL / 10)
    assert list(got.grads) == list(params) == list(got.params)
    _close(got.grads, grads, "grad")
    _close(got.params, updated, "updated")
    return got, P.transformer_cost(strategy, config, B, S, n, dtype=DTYPE, optimizer=optimizer, **options)


@pytest.mark.parametrize(("config", "strategy", "n", "optimizer"), CASES)
def test_step_equals_one_device_and_the_cost_model(config, strategy, n, optimizer):
    got, model = _step_against_one_device(config, strategy, n, optimizer)
    assert got.collectives == model.collectives  # as the program issued them
    assert got.bytes_by_rank == model.bytes_by_rank  # as the compiled module sends them
    assert got.bytes_by_kind == model.bytes_by_kind
    assert _memory(got) == _memory(model)
    assert got.activation_bytes_per_rank == model.activation_bytes_per_rank > 0  # the tapes a rank kept


def test_adamw_steps_carry_the_sharded_state():
    params, tokens, targets = _inputs(GQA, seed=1)  # zero2 on 4 devices: the program compiled above
    want, _, final = _one_device(params, GQA, tokens, targets, ADAMW, 3)
    state, got = None, []
    for _ in range(3):  # the first step starts the state, the next two read it: one program for all
        r = be.parallel.transformer_step(
            params, GQA, tokens, targets, strategy="zero2", world_size=4, optimizer="adamw", lr=ADAMW.lr,
            eps=ADAMW.eps, weight_decay=ADAMW.weight_decay, state=state, timeout=120,
        )  # fmt: skip
        got.append(r.loss)
        params, state = r.params, r.state
    np.testing.assert_allclose(got, want, rtol=RTOL / 10)
    _close(params, final, "after 3 steps")
    assert state["step"] == 3 and list(state["m"]) == list(params)


DEEP = tensorglot.TransformerConfig(
    vocab_size=16, d_model=16, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=4, d_ff=32, max_seq_len=S,
    activation="gelu",
)  # fmt: skip
PIPELINES = [pytest.param(GQA, "1f1b", 2, 2, "adamw", id="1f1b-2-m2-adamw")]
PIPELINES += [
    pytest.param(c, sched, n, m, o, id=f"{sched}-{n}-m{m}-{o}-L{c.n_layers}", marks=slow)
    for c, sched, n, m, o in [
        (GQA, "gpipe", 2, 4, "sgd"),
        (DEEP, "1f1b", 4, 4, "sgd"),
        (DEEP, "gpipe", 2, 2, "adamw"),  # two blocks per stage
        (GQA, "zb_h1", 2, 2, "sgd"),
        (DEEP, "zb_h1", 4, 4, "adamw"),
    ]
]


@pytest.mark.parametrize(("config", "schedule", "n", "m", "optimizer"), PIPELINES)
def test_pipeline_equals_one_device_and_runs_the_table(config, schedule, n, m, optimizer):
    got, model = _step_against_one_device(config, "pp", n, optimizer, microbatches=m, schedule=schedule)
    assert got.schedule == tuple(sorted(P.pipeline_schedule(schedule, n, m)))  # every row of the table, once
    assert 1 + max(row[0] for row in got.schedule) == model.slots
    assert got.collectives == model.collectives  # the busiest stage's sends, in the table's order
    assert got.bytes_by_rank == model.bytes_by_rank  # as the compiled module's collective-permutes send them
    assert _memory(got) == _memory(model)
    assert got.activation_bytes_by_stage == model.activation_bytes_by_stage


@pytest.mark.parametrize(
    ("strategy", "schedule", "n"),
    [("pp", "interleaved", 2), ("dp_pp", "1f1b", 4), ("tp_pp", "zb_h1", 4)],
)
def test_pipelines_it_does_not_run_are_refused_naming_what_runs(strategy, schedule, n):
    params, tokens, targets = _inputs(DEEP)
    chunks = 2 if schedule == "interleaved" else None
    with pytest.raises(
        ValueError, match=f"strategy '{strategy}' with schedule '{schedule}' .*runs pp with gpipe, 1f1b, zb_h1"
    ):
        be.parallel.transformer_step(
            params, DEEP, tokens, targets, strategy=strategy, world_size=n, schedule=schedule, chunks=chunks
        )


def test_more_ranks_than_devices_is_refused():
    params, _, _ = _inputs(GQA)
    n = len(jax.devices()) * 2
    tokens = np.zeros((n, S), np.int64)
    with pytest.raises(ValueError, match=r"transformer_step: world_size = .* JAX devices"):
        be.parallel.transformer_step(params, GQA, tokens, tokens, strategy="dp", world_size=n)


@slow
def test_cli_prints_measured_against_modelled(capsys):
    from tensorglot.cli import main

    args = ["parallel", "--model", "transformer", "--backend", "jax", "--strategy", "tp_sp", "--world-size", "2"]
    args += ["--layers", "2", "--d-model", "16", "--d-ff", "32", "--batch", "4", "--repeats", "1", "--json"]
    assert main(args) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["bytes_by_kind_measured"] == row["bytes_by_kind_model"] and row["max_abs_error"] < 1e-4
