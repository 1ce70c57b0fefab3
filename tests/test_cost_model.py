"""The cost model and pipeline schedules against examples worked by hand (the numbers are in the comments)."""

from __future__ import annotations

import pytest

from tensorglot import parallel as P

# L=2 layers, B=8, D=4, F=8, float32: each weight is 4·8·4 = 128 bytes, P = 4 weights = 512 bytes,
# one (B, D) activation is 8·4·4 = 128 bytes.
SMALL = P.MLPShape(layers=2, batch=8, d_model=4, d_ff=8)


def test_ring_formulas_by_hand():
    assert P.ring_all_gather_bytes(1000, 4) == 750  # 3/4 · 1000
    assert P.ring_reduce_scatter_bytes(1000, 4) == 750
    assert P.ring_all_reduce_bytes(1000, 4) == 1500  # 2 · 3/4 · 1000
    assert P.ring_all_reduce_bytes(100, 2) == 100  # 2 · 1/2 · 100
    assert P.ring_all_reduce_bytes(100, 1) == 0  # alone, nothing moves
    assert P.send_bytes(64) == 64


def test_shards_that_do_not_divide_are_an_error():
    with pytest.raises(ValueError, match="not a whole number"):
        P.ring_all_gather_bytes(10, 4)  # 7.5 bytes


def test_dp_all_reduces_every_gradient():
    # 4 gradients of 128 bytes; n = 2: 2·(1/2)·128 = 128 each → 512; n = 4: 2·(3/4)·128 = 192 each → 768.
    assert P.step_cost("dp", SMALL, 2).bytes_per_device == 512
    cost = P.step_cost("dp", SMALL, 4)
    assert cost.bytes_by_rank == (768,) * 4
    assert [c.tensor for c in cost.collectives] == [
        "layers.1.w_out grad",
        "layers.1.w_in grad",
        "layers.0.w_out grad",
        "layers.0.w_in grad",
    ]  # backward order
    assert cost.param_bytes_per_rank == 512  # replicated


def test_tp_all_reduces_activations_twice_per_layer():
    # 2 layers × (forward output + backward input grad) = 4 all-reduces of 128 bytes; n = 2: 128 each.
    cost = P.step_cost("tp", SMALL, 2)
    assert cost.bytes_per_device == 512
    assert [c.kind for c in cost.collectives] == ["all_reduce"] * 4
    assert cost.param_bytes_per_rank == 256  # half of w_in's columns and of w_out's rows


def test_fsdp_gathers_twice_and_reduce_scatters_once():
    # per layer: 2 gathers forward, 2 gathers backward, 2 reduce-scatters, each (1/2)·128 = 64 → 384;
    # 2 layers → 768.
    cost = P.step_cost("fsdp", SMALL, 2)
    assert cost.bytes_per_device == 768
    kinds = [c.kind for c in cost.collectives]
    assert kinds.count("all_gather") == 8 and kinds.count("reduce_scatter") == 4
    assert cost.param_bytes_per_rank == 256  # 512 / 2


def test_pp_ends_send_one_way_middles_both():
    # L=4 layers on 4 stages, m=2 microbatches of (4, 4) float32 = 64 bytes.
    shape = P.MLPShape(layers=4, batch=8, d_model=4, d_ff=8)
    cost = P.step_cost("pp", shape, 4, microbatches=2)
    assert cost.bytes_by_rank == (128, 256, 256, 128)  # stage 0: 2 forward; 1, 2: 2 + 2; 3: 2 backward
    assert cost.bytes_per_device == 256
    assert cost.param_bytes_per_rank == 4 * 256 // 4  # one layer of 256 bytes each
    assert cost.bubble == pytest.approx(3 / 5)  # (p−1)/(m+p−1)


def test_dp_tp_on_a_two_by_two_mesh():
    # t=2 inside each row on B/d = 4 samples: activation 4·4·4 = 64 bytes, 4 all-reduces over 2 → 64 each = 256;
    # across rows: 4 gradient shards of 128/2 = 64 bytes, all-reduced over 2 → 64 each = 256. Total 512.
    cost = P.step_cost("dp_tp", SMALL, 4, tp_size=2)
    assert cost.bytes_per_device == 512
    assert {c.group_size for c in cost.collectives} == {2}
    assert cost.param_bytes_per_rank == 256


def test_bfloat16_halves_every_byte():
    half = P.MLPShape(layers=2, batch=8, d_model=4, d_ff=8, dtype="bfloat16")
    for strategy in ("dp", "tp", "fsdp"):
        assert 2 * P.step_cost(strategy, half, 2).bytes_per_device == P.step_cost(strategy, SMALL, 2).bytes_per_device


def test_one_device_moves_nothing():
    for strategy in P.STRATEGIES:
        assert P.step_cost(strategy, SMALL, 1).bytes_per_device == 0


@pytest.mark.parametrize(
    "strategy,kwargs,message",
    [
        ("dp", {"world_size": 3}, "dp needs batch = 8 divisible by world_size = 3"),
        ("fsdp", {"world_size": 8}, r"fsdp needs d_model \(w_in's first axis\) = 4 divisible by world_size = 8"),
        ("tp", {"world_size": 3}, "tp needs d_ff = 8 divisible by world_size = 3"),
        ("pp", {"world_size": 4}, "pp needs layers = 2 divisible by world_size = 4"),
        ("pp", {"world_size": 2, "microbatches": 3}, "pp needs batch = 8 divisible by microbatches = 3"),
        ("pp", {"world_size": 2, "microbatches": 0}, "microbatches must be a positive int, got 0"),
        ("dp_tp", {"world_size": 4, "tp_size": 3}, "dp_tp needs tp_size dividing world_size = 4, got 3"),
        ("ddp", {"world_size": 2}, "unknown strategy 'ddp', wanted one of dp, tp, fsdp, pp, dp_tp"),
        ("dp", {"world_size": 0}, "world_size must be a positive int, got 0"),
    ],
)
def test_check_step_says_what_does_not_divide(strategy, kwargs, message):
    n = kwargs.pop("world_size")
    with pytest.raises(ValueError, match=message):
        P.check_step(strategy, SMALL, n, **kwargs)


def test_default_tp_size_is_the_squarest_mesh():
    assert [P.default_tp_size(n) for n in (1, 2, 4, 8, 9, 12)] == [1, 1, 2, 2, 3, 3]


# Pipeline schedules


def test_gpipe_by_hand_for_three_stages_two_microbatches():
    # forward diagonal (slot = stage + microbatch), then backward from the last stage
    assert P.pipeline_schedule("gpipe", 3, 2) == [
        (0, 0, "F", 0), (1, 0, "F", 1), (1, 1, "F", 0), (2, 1, "F", 1), (2, 2, "F", 0), (3, 2, "F", 1),
        (4, 2, "B", 0), (5, 1, "B", 0), (5, 2, "B", 1), (6, 0, "B", 0), (6, 1, "B", 1), (7, 0, "B", 1),
    ]  # fmt: skip


def test_1f1b_by_hand_for_three_stages_three_microbatches():
    # stage 0 warms up with p−1 = 2 forwards, stage 2 alternates from the start
    table = P.pipeline_schedule("1f1b", 3, 3)
    by_stage = {i: [(op, j) for _, s, op, j in table if s == i] for i in range(3)}
    assert by_stage[0] == [("F", 0), ("F", 1), ("F", 2), ("B", 0), ("B", 1), ("B", 2)]
    assert by_stage[1] == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("B", 2)]
    assert by_stage[2] == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2)]


@pytest.mark.parametrize("kind", P.SCHEDULES)
@pytest.mark.parametrize("p,m", [(1, 1), (2, 1), (2, 4), (3, 2), (4, 4), (4, 8), (5, 3)])
def test_schedule_laws(kind, p, m):
    table = P.pipeline_schedule(kind, p, m)
    assert sorted((i, op, j) for _, i, op, j in table) == sorted(
        (i, op, j) for i in range(p) for op in "FB" for j in range(m)
    )  # every op once
    assert len({(t, i) for t, i, _, _ in table}) == len(table)  # a stage does one op per slot
    at = {(op, i, j): t for t, i, op, j in table}
    for i in range(p):
        for j in range(m):
            if i > 0:
                assert at["F", i, j] > at["F", i - 1, j]
            if i < p - 1:
                assert at["B", i, j] > at["B", i + 1, j]
            assert at["B", i, j] > at["F", i, j]
    # m + p − 1 slots per direction: the whole table takes 2(m + p − 1), each stage busy 2m of them.
    assert P.schedule_slots(table) == 2 * (m + p - 1)
    idle = 1 - 2 * m / P.schedule_slots(table)
    assert idle == pytest.approx(P.pipeline_bubble(p, m))
    held = P.activations_held(table, p)
    assert held == ([m] * p if kind == "gpipe" else [min(p - i, m) for i in range(p)])


def test_gpipe_forwards_fill_m_plus_p_minus_1_slots():
    table = P.pipeline_schedule("gpipe", 4, 6)
    assert len({t for t, _, op, _ in table if op == "F"}) == 6 + 4 - 1
    assert len({t for t, _, op, _ in table if op == "B"}) == 6 + 4 - 1


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="unknown kind 'interleaved', wanted one of gpipe, 1f1b"):
        P.pipeline_schedule("interleaved", 2, 2)
