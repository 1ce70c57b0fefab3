"""The transformer's parallel training step on NumPy's simulated mesh: every strategy computes the
one-device `value_and_grad` and update, moves exactly the collectives and keeps exactly the memory the
cost model says, and runs the pipeline schedule it predicts."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tensorglot
from tensorglot import parallel as P
from tensorglot.parallel.transformer_optim import Optimizer, one_device_steps

be = tensorglot.get_backend("numpy")
B, S = 4, 8

# swiglu with K | n for n = 2; relu, tied and one kv head (replicated on every tp rank) for the other
GQA = tensorglot.TransformerConfig(
    vocab_size=16, d_model=8, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=2, d_ff=16, max_seq_len=S
)
MQA_TIED = tensorglot.TransformerConfig(
    vocab_size=16,
    d_model=8,
    n_layers=2,
    n_heads=4,
    n_kv_heads=1,
    head_dim=2,
    d_ff=16,
    max_seq_len=S,
    activation="gelu",
    tie_embeddings=True,
)
GQA_RUNS = [("dp", 2), ("zero1", 2), ("zero2", 4), ("fsdp", 2), ("fsdp", 4), ("tp", 2), ("tp", 4), ("tp_sp", 2)]
GQA_RUNS += [("tp_sp", 4), ("cp", 2), ("cp", 4), ("pp", 2), ("dp_tp", 4), ("dp_pp", 4), ("tp_pp", 4), ("dp_tp_pp", 8)]
GQA_RUNS += [("fsdp_tp", 4), ("fsdp_tp", 8)]
MQA_RUNS = [("dp", 4), ("zero1", 4), ("fsdp", 2), ("tp", 4), ("tp_sp", 2), ("cp", 2), ("dp_tp", 4), ("fsdp_tp", 4)]
CASES = [(GQA, s, n) for s, n in GQA_RUNS] + [(MQA_TIED, s, n) for s, n in MQA_RUNS]


def _inputs(config, seed=0):
    params = tensorglot.init_params(config, seed=seed, dtype="float64")
    rng = np.random.default_rng(seed)
    return params, rng.integers(0, config.vocab_size, (B, S)), rng.integers(0, config.vocab_size, (B, S))


def _one_device(params, config, tokens, targets, opt, steps):
    return one_device_steps(be.layers, params, config, tokens, targets, opt, steps)


@pytest.mark.parametrize(("config", "strategy", "n"), CASES, ids=lambda c: getattr(c, "activation", c))
def test_step_equals_one_device_and_the_cost_model(config, strategy, n):
    params, tokens, targets = _inputs(config)
    got = be.parallel.transformer_step(params, config, tokens, targets, strategy=strategy, world_size=n, lr=0.1)
    (loss,), grads, updated = _one_device(params, config, tokens, targets, Optimizer("sgd", 0.1), 1)
    np.testing.assert_allclose(got.loss, loss, rtol=1e-10)
    assert list(got.grads) == list(params)
    for k in params:
        np.testing.assert_allclose(got.grads[k], grads[k], rtol=1e-10, atol=1e-14, err_msg=k)
        np.testing.assert_allclose(got.params[k], updated[k], rtol=1e-10, atol=1e-14, err_msg=k)
    model = P.transformer_cost(strategy, config, B, S, n, dtype="float64")
    assert got.collectives == model.collectives
    assert got.bytes_by_rank == model.bytes_by_rank
    assert got.bytes_by_kind == model.bytes_by_kind
    assert (got.param_bytes_per_rank, got.grad_bytes_per_rank) == (
        model.param_bytes_per_rank,
        model.grad_bytes_per_rank,
    )
    assert got.activation_bytes_per_rank == model.activation_bytes_per_rank > 0  # the tapes a rank kept


@pytest.mark.parametrize("strategy", ["dp", "zero1", "zero2", "fsdp", "tp", "cp", "pp"])
def test_adamw_steps_equal_one_device(strategy):
    params, tokens, targets = _inputs(GQA, seed=1)
    opt = Optimizer("adamw", lr=1e-2, weight_decay=0.1)
    want, _, final = _one_device(params, GQA, tokens, targets, opt, 3)
    state, got = None, []
    for _ in range(3):
        r = be.parallel.transformer_step(
            params, GQA, tokens, targets, strategy=strategy, world_size=2, optimizer="adamw", lr=1e-2,
            weight_decay=0.1, state=state,
        )  # fmt: skip
        got.append(r.loss)
        params, state = r.params, r.state
    np.testing.assert_allclose(got, want, rtol=1e-10)
    for k in final:
        np.testing.assert_allclose(params[k], final[k], rtol=1e-10, atol=1e-14, err_msg=k)
    assert state["step"] == 3
    model = P.transformer_cost(strategy, GQA, B, S, 2, dtype="float64", optimizer="adamw")
    assert r.optimizer_bytes_per_rank == model.optimizer_bytes_per_rank > 0


def test_adamw_is_torchs():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    w0, gs = rng.standard_normal(6), rng.standard_normal((3, 6))
    opt = Optimizer("adamw", lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.2)
    tw = torch.tensor(w0, requires_grad=True)
    ref = torch.optim.AdamW([tw], lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.2)
    w, m, v = w0, np.zeros(6), np.zeros(6)
    for t, g in enumerate(gs):
        tw.grad = torch.tensor(g)
        ref.step()
        w, m, v = opt.update(w, g, m, v, t)
    np.testing.assert_allclose(w, tw.detach().numpy(), rtol=1e-12)


@pytest.mark.parametrize(("schedule", "m"), [("gpipe", 4), ("1f1b", 4), ("1f1b", 2)])
def test_pipeline_runs_the_modelled_schedule(schedule, m):
    config = GQA.__class__(**{**GQA.to_dict(), "n_layers": 4})
    params, tokens, targets = _inputs(config)
    got = be.parallel.transformer_step(
        params, config, tokens, targets, strategy="pp", world_size=4, microbatches=m, schedule=schedule
    )
    assert list(got.schedule) == sorted(P.pipeline_schedule(schedule, 4, m))
    model = P.transformer_cost("pp", config, B, S, 4, microbatches=m, schedule=schedule, dtype="float64")
    assert got.bytes_by_rank == model.bytes_by_rank
    assert got.activation_bytes_by_stage == model.activation_bytes_by_stage  # the tapes each stage kept
    assert model.slots == 2 * (m + 4 - 1) and model.bubble == pytest.approx(3 / (m + 3))
    gpipe = P.transformer_cost("pp", config, B, S, 4, microbatches=m, schedule="gpipe", dtype="float64")
    if schedule == "1f1b":  # 1F1B's point: stage i keeps min(p − i, m) microbatches, not m
        assert all(a <= g for a, g in zip(model.activation_bytes_by_stage, gpipe.activation_bytes_by_stage))
        assert model.activation_bytes_by_stage[-1] < gpipe.activation_bytes_by_stage[-1]
    loss, _ = be.layers.value_and_grad(tokens, targets, params, config)
    np.testing.assert_allclose(got.loss, float(loss), rtol=1e-10)


@pytest.mark.parametrize(("strategy", "n", "m", "chunks"), [("pp", 2, 2, 2), ("pp", 2, 4, 2), ("dp_tp_pp", 8, 2, 2)])
def test_interleaved_pipeline_equals_one_device_with_a_smaller_bubble(strategy, n, m, chunks):
    from tensorglot.parallel.transformer_schedules import interleaved_schedule

    config = GQA.__class__(**{**GQA.to_dict(), "n_layers": 4, "n_kv_heads": 1})
    params, tokens, targets = _inputs(config, seed=3)
    kw = {"microbatches": m, "schedule": "interleaved", "chunks": chunks}
    got = be.parallel.transformer_step(params, config, tokens, targets, strategy=strategy, world_size=n, **kw)
    loss, grads = be.layers.value_and_grad(tokens, targets, params, config)
    np.testing.assert_allclose(got.loss, float(loss), rtol=1e-10)
    for k in params:
        np.testing.assert_allclose(got.grads[k], grads[k], rtol=1e-10, atol=1e-14, err_msg=k)
    model = P.transformer_cost(strategy, config, B, S, n, dtype="float64", **kw)
    assert got.collectives == model.collectives and got.bytes_by_rank == model.bytes_by_rank
    assert got.activation_bytes_by_stage == model.activation_bytes_by_stage
    p = 2
    assert list(got.schedule) == sorted(interleaved_schedule(p, m, chunks))
    plain = P.transformer_cost(strategy, config, B, S, n, microbatches=m, schedule="1f1b")
    assert model.bubble == pytest.approx((p - 1) / (chunks * m + p - 1)) and model.bubble < plain.bubble


@pytest.mark.parametrize(
    ("strategy", "n", "m", "activation"),
    [
        ("pp", 4, 4, "swiglu"),
        ("pp", 2, 4, "gelu"),
        ("pp", 4, 2, "relu"),
        ("tp_pp", 4, 2, "swiglu"),
        ("dp_tp_pp", 8, 2, "gelu"),
    ],
)
def test_zero_bubble_pipeline_equals_one_device_with_a_third_of_1f1bs_bubble(strategy, n, m, activation):
    config = GQA.__class__(**{**GQA.to_dict(), "n_layers": 4, "activation": activation})
    params, tokens, targets = _inputs(config, seed=6)
    kw = {"microbatches": m, "schedule": "zb_h1"}
    got = be.parallel.transformer_step(params, config, tokens, targets, strategy=strategy, world_size=n, lr=0.1, **kw)
    loss, grads = be.layers.value_and_grad(tokens, targets, params, config)
    np.testing.assert_allclose(got.loss, float(loss), rtol=1e-10)
    for k in params:
        np.testing.assert_allclose(got.grads[k], grads[k], rtol=1e-10, atol=1e-14, err_msg=k)
        np.testing.assert_allclose(got.params[k], params[k] - 0.1 * grads[k], rtol=1e-10, atol=1e-14, err_msg=k)
    model = P.transformer_cost(strategy, config, B, S, n, dtype="float64", **kw)
    assert got.collectives == model.collectives and got.bytes_by_rank == model.bytes_by_rank
    assert got.activation_bytes_by_stage == model.activation_bytes_by_stage  # tapes and W's buffers
    p = model.activations_held.__len__()
    assert list(got.schedule) == sorted(P.pipeline_schedule("zb_h1", p, m))
    ran = 1 + max(row[0] for row in got.schedule)  # the slots the stages actually ran
    assert ran == model.slots and sum(op == "W" for _, _, op, _ in got.schedule) == p * m
    if m >= p:  # the paper's H1: (p−1)(T_F + T_B − T_W) idle slots per stage
        assert model.slots == 3 * m + p - 1 and model.bubble == pytest.approx((p - 1) / (3 * m + p - 1))
    plain = P.transformer_cost(strategy, config, B, S, n, microbatches=m, schedule="1f1b", dtype="float64")
    assert model.bubble < plain.bubble
    assert max(model.activations_held) == max(plain.activations_held)  # ZB-H1: 1F1B's min(p, m) microbatches


def test_zero_bubble_schedule_laws():
    for p, m in [(1, 3), (2, 2), (3, 5), (4, 2), (4, 8)]:
        table = P.pipeline_schedule("zb_h1", p, m)
        slot = {(op, i, j): t for t, i, op, j in table}
        assert len(slot) == len(table) == 3 * p * m
        for (op, i, j), t in slot.items():  # each op after what it reads
            if op == "W":
                assert t > slot["B", i, j]
            elif op == "B":
                assert t > (slot["F", i, j] if i == p - 1 else slot["B", i + 1, j])
            elif i > 0:
                assert t > slot["F", i - 1, j]
        assert len({(t, i) for t, i, _, _ in table}) == len(table)  # one op per stage and slot
        assert P.activations_held(table, p) == [min(p, m)] * p  # from F to W


def test_interleaved_with_one_chunk_takes_1f1b_slots():
    from tensorglot.parallel.transformer_schedules import interleaved_schedule

    for p, m in [(2, 2), (4, 4), (4, 8)]:
        rows = interleaved_schedule(p, m, 1)
        assert 1 + max(r[0] for r in rows) == P.schedule_slots(P.pipeline_schedule("1f1b", p, m)) == 2 * (m + p - 1)
        assert sorted((i, op, j) for _, i, op, j, _ in rows) == sorted(
            (i, op, j) for _, i, op, j in P.pipeline_schedule("1f1b", p, m)
        )


def test_ring_attention_positions_balance_the_causal_work():
    from tensorglot.parallel.transformer_ring import cp_positions

    n, seq = 4, 16
    held = [cp_positions(seq, n, r) for r in range(n)]
    assert sorted(np.concatenate(held).tolist()) == list(range(seq))
    visible = {int(sum(p + 1 for p in pos)) for pos in held}  # keys a rank's queries see under the mask
    assert visible == {sum(range(1, seq + 1)) // n}


def test_cost_model_closed_forms():
    """The per-collective model against the formulas written by hand (float32, n = 4)."""
    n, c, item = 4, GQA, 4
    sizes = {k: int(np.prod(s)) * item for k, s in tensorglot.params.param_shapes(c).items()}
    total, act = sum(sizes.values()), B * S * c.d_model * item
    cost = {s: P.transformer_cost(s, c, B, S, n) for s in ("dp", "zero1", "zero2", "fsdp")}
    assert cost["dp"].bytes_per_device == 2 * (n - 1) * total // n
    assert cost["zero1"].bytes_per_device == cost["zero2"].bytes_per_device == cost["dp"].bytes_per_device
    assert cost["fsdp"].bytes_per_device == (3 * total - sizes["embed"]) * (n - 1) // n
    assert cost["fsdp"].param_bytes_per_rank == total // n and cost["dp"].param_bytes_per_rank == total
    assert cost["zero2"].grad_bytes_per_rank == total // n and cost["zero1"].grad_bytes_per_rank == total
    tp = P.transformer_cost("tp", c, B, S, 2)
    assert tp.bytes_by_kind == {"all_reduce": 8 * c.n_layers * act // 2}
    sp = P.transformer_cost("tp_sp", c, B, S, 2)
    replicated = sum(v for k, v in sizes.items() if k.endswith("norm") or k in ("embed", "lm_head"))
    half = 4 * c.n_layers * act // 2  # (n−1)/n of A, four times per block each way
    assert sp.bytes_by_kind == {"all_gather": half, "reduce_scatter": half, "all_reduce": replicated}
    assert sp.bytes_per_device == tp.bytes_per_device + replicated
    pp = P.transformer_cost("pp", c, B, S, 2, microbatches=4)
    assert pp.bytes_by_rank == (act, act)  # 4 microbatches of A/4, one way each
    cp = P.transformer_cost("cp", c, B, S, 2)
    kv = B * S // 2 * c.n_kv_heads * c.head_dim * item  # one K or V block
    assert cp.bytes_by_kind == {"send": c.n_layers * (2 + 6) * kv, "all_reduce": total}  # n−1 = 1 ring step
    D, H, N, K, V, L = c.d_model, c.head_dim, c.n_heads, c.n_kv_heads, c.vocab_size, c.n_layers
    tape = L * (4 * D + 2 * N * H + 2 * K * H) + 2 * D + V  # per position: every block's tape, the head's
    assert P.transformer_cost("dp", c, B, S, n).activation_bytes_per_rank == B // n * S * tape * item
    assert P.transformer_cost("cp", c, B, S, 2).activation_bytes_per_rank == B * S // 2 * tape * item
    sp_tape = L * (2 * D // 2 + 2 * D + 2 * (N // 2) * H + 2 * (K // 2) * H) + (2 * D + V) // 2
    assert P.transformer_cost("tp_sp", c, B, S, 2).activation_bytes_per_rank == B * S * sp_tape * item
    adam = P.transformer_cost("fsdp", c, B, S, n, optimizer="adamw")
    assert adam.optimizer_bytes_per_rank == 2 * total // n


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strategy": "ring"}, "unknown strategy 'ring'"),
        ({"strategy": "dp", "world_size": 3}, "batch = 4 divisible by world_size = 3"),
        ({"strategy": "tp", "world_size": 8}, "n_heads = 4 divisible by the tp size = 8"),
        ({"strategy": "tp_sp", "world_size": 4, "seq": 6}, "sequence length = 6 divisible"),
        ({"strategy": "cp", "world_size": 2, "seq": 6}, r"sequence length = 6 divisible by 2·world_size"),
        ({"strategy": "pp", "world_size": 2, "microbatches": 3}, "batch per replica = 4 divisible by microbatches = 3"),
        ({"strategy": "dp", "microbatches": 2}, "microbatches are pp's"),
        ({"strategy": "pp", "schedule": "interleaved", "chunks": 2}, "chunks dividing n_layers / stages = 2/2"),
        ({"strategy": "pp", "schedule": "1f1b", "chunks": 2}, "chunks are the interleaved schedule's"),
        ({"strategy": "pp", "schedule": "zb_h1", "chunks": 2}, "chunks are the interleaved schedule's; zb_h1"),
        ({"strategy": "pp", "schedule": "zb_h2"}, "unknown schedule 'zb_h2', wanted one of gpipe, 1f1b, interleaved"),
        ({"strategy": "pp", "config": MQA_TIED}, "pp needs untied embeddings"),
        ({"strategy": "dp", "optimizer": "lion"}, "optimizer must be one of sgd, adamw"),
        ({"strategy": "dp", "timeout": 0}, "timeout must be a positive number"),
    ],
)
def test_bad_input_is_refused_before_any_rank_runs(kwargs, match):
    config, seq = kwargs.pop("config", GQA), kwargs.pop("seq", S)
    params, tokens, targets = _inputs(config)
    kwargs.setdefault("world_size", 2)
    with pytest.raises(ValueError, match=match):
        be.parallel.transformer_step(params, config, tokens[:, :seq], targets[:, :seq], **kwargs)


def test_cli_prints_measured_against_modelled(capsys):
    from tensorglot.cli import main

    args = ["parallel", "--model", "transformer", "--backend", "numpy", "--world-size", "2", "--layers", "2"]
    assert (
        main(
            [*args, "--batch", "4", "--d-model", "8", "--d-ff", "16", "--repeats", "1", "--microbatches", "2", "--json"]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert [r["strategy"] for r in rows] == list(P.TRANSFORMER_STRATEGIES)
    for r in rows:
        assert r["bytes_by_kind_measured"] == r["bytes_by_kind_model"] and r["bytes_per_device_measured"] > 0
        assert r["param_bytes_per_rank"][0] == r["param_bytes_per_rank"][1]
        assert r["max_abs_error"] < 1e-5
        assert r["activation_bytes_per_rank"][0] == r["activation_bytes_per_rank"][1] > 0
    assert main([*args, "--strategy", "ring"]) != 0
    assert "unknown transformer strategy 'ring'" in capsys.readouterr().err


@pytest.mark.parametrize(("schedule", "chunks", "slots"), [("zb_h1", None, 3 * 4 + 2 - 1), ("interleaved", "2", 18)])
def test_cli_runs_every_pipeline_schedule(schedule, chunks, slots, capsys):
    from tensorglot.cli import main

    args = ["parallel", "--model", "transformer", "--backend", "numpy", "--world-size", "2", "--layers", "4"]
    args += ["--batch", "4", "--d-model", "8", "--d-ff", "16", "--repeats", "1", "--microbatches", "4"]
    args += ["--strategy", "pp", "--schedule", schedule, *(["--chunks", chunks] if chunks else [])]
    assert main([*args, "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["schedule"] == schedule and row["slots"] == [slots, slots]
    assert row["bytes_by_kind_measured"] == row["bytes_by_kind_model"] and row["max_abs_error"] < 1e-5
    assert main(args) == 0
    assert "measured differs" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model", "transformer", "--strategy", "pp", "--schedule", "zb_h2"], "argument --schedule: invalid choice"),
        (["--model", "transformer", "--strategy", "pp", "--chunks", "0"], "argument --chunks: wanted a positive int"),
        (["--model", "transformer", "--strategy", "pp", "--chunks", "2"], "chunks are the interleaved schedule's"),
        (["--strategy", "pp", "--schedule", "zb_h1"], "the MLP's pipeline runs gpipe or 1f1b without --chunks"),
    ],
)
def test_cli_refuses_a_bad_schedule_in_one_line(flags, message, capsys):
    from tensorglot.cli import main

    try:
        code = main(["parallel", "--backend", "numpy", "--layers", "2", "--batch", "4", *flags])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tensorglot parallel: error: ") and message in err[0], err
