"""The transformer's parallel training step on torch: real processes over gloo (one set of 2 ranks kept
for every strategy), equal to the one-device `value_and_grad` in float64 and to the cost model."""

from __future__ import annotations

import numpy as np
import pytest

import tensorglot
from tensorglot import parallel as P
from tensorglot.parallel.transformer_optim import Optimizer

pytest.importorskip("torch")
tparallel = pytest.importorskip("tensorglot_torch.parallel")

pytestmark = pytest.mark.distributed
B, S = 4, 8
GQA = tensorglot.TransformerConfig(
    vocab_size=16, d_model=8, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=2, d_ff=16, max_seq_len=S
)
MQA_TIED = tensorglot.TransformerConfig(**{**GQA.to_dict(), "n_kv_heads": 1, "tie_embeddings": True})
ref = tensorglot.get_backend("numpy")


def _inputs(config, seed=0):
    params = tensorglot.init_params(config, seed=seed, dtype="float64")
    rng = np.random.default_rng(seed)
    return params, rng.integers(0, config.vocab_size, (B, S)), rng.integers(0, config.vocab_size, (B, S))


def _adamw_runs(params, config, tokens, targets, strategy, n, steps=3):
    """(losses and params after `steps` AdamW steps on one process, the same under `strategy` on n ranks)."""
    opt = Optimizer("adamw", lr=1e-2, weight_decay=0.1)
    want, p1, m, v = [], dict(params), {}, {}
    for t in range(steps):
        loss, grads = ref.layers.value_and_grad(tokens, targets, p1, config)
        want.append(float(loss))
        for k, w in p1.items():
            p1[k], m[k], v[k] = opt.update(w, grads[k], m.get(k, 0 * w), v.get(k, 0 * w), t)
    state, got = None, []
    for _ in range(steps):
        r = tparallel.transformer_step(
            params, config, tokens, targets, strategy=strategy, world_size=n, optimizer="adamw", lr=1e-2,
            weight_decay=0.1, state=state, timeout=300,
        )  # fmt: skip
        got.append(r.loss)
        params, state = r.params, r.state
    np.testing.assert_allclose(got, want, rtol=1e-10)
    for k in p1:
        np.testing.assert_allclose(params[k], p1[k], rtol=1e-10, atol=1e-14, err_msg=k)
    return r


@pytest.mark.timeout(240)
def test_every_strategy_on_two_gloo_ranks_equals_one_device():
    runs = [(GQA, s) for s in ("dp", "zero1", "zero2", "fsdp", "tp", "tp_sp", "cp", "pp")]
    runs += [(MQA_TIED, "tp"), (MQA_TIED, "cp")]
    for config, strategy in runs:
        params, tokens, targets = _inputs(config)
        got = tparallel.transformer_step(params, config, tokens, targets, strategy=strategy, world_size=2, timeout=120)
        loss, grads = ref.layers.value_and_grad(tokens, targets, params, config)
        np.testing.assert_allclose(got.loss, float(loss), rtol=1e-10, err_msg=strategy)
        for k in params:
            np.testing.assert_allclose(got.grads[k], grads[k], rtol=1e-10, atol=1e-14, err_msg=f"{strategy} {k}")
            np.testing.assert_allclose(got.params[k], params[k] - 0.1 * grads[k], rtol=1e-10, atol=1e-14)
        model = P.transformer_cost(strategy, config, B, S, 2, dtype="float64")
        assert got.collectives == model.collectives, strategy
        assert got.bytes_by_rank == model.bytes_by_rank, strategy
        assert got.param_bytes_per_rank == model.param_bytes_per_rank, strategy
        assert got.activation_bytes_per_rank == model.activation_bytes_per_rank, strategy
    assert list(got.schedule) == [] and got.world_size == 2
    deep = tensorglot.TransformerConfig(**{**GQA.to_dict(), "n_layers": 4})  # interleaved: 2 chunks per device
    params, tokens, targets = _inputs(deep)
    kw = {"microbatches": 2, "schedule": "interleaved", "chunks": 2, "timeout": 120}
    got = tparallel.transformer_step(params, deep, tokens, targets, strategy="pp", world_size=2, **kw)
    loss, grads = ref.layers.value_and_grad(tokens, targets, params, deep)
    np.testing.assert_allclose(got.loss, float(loss), rtol=1e-10)
    for k in params:
        np.testing.assert_allclose(got.grads[k], grads[k], rtol=1e-10, atol=1e-14, err_msg=f"interleaved {k}")


@pytest.mark.timeout(180)
def test_zero_bubble_pipeline_on_two_gloo_ranks_equals_one_device_and_runs_the_modelled_slots():
    config = tensorglot.TransformerConfig(**{**GQA.to_dict(), "activation": "swiglu"})
    params, tokens, targets = _inputs(config, seed=7)
    kw = {"microbatches": 4, "schedule": "zb_h1"}
    got = tparallel.transformer_step(params, config, tokens, targets, strategy="pp", world_size=2, timeout=120, **kw)
    loss, grads = ref.layers.value_and_grad(tokens, targets, params, config)
    np.testing.assert_allclose(got.loss, float(loss), rtol=1e-10)
    for k in params:
        np.testing.assert_allclose(got.grads[k], grads[k], rtol=1e-10, atol=1e-14, err_msg=f"zb_h1 {k}")
    model = P.transformer_cost("pp", config, B, S, 2, dtype="float64", **kw)
    assert got.collectives == model.collectives and got.bytes_by_rank == model.bytes_by_rank
    assert got.activation_bytes_by_stage == model.activation_bytes_by_stage
    assert list(got.schedule) == sorted(P.pipeline_schedule("zb_h1", 2, 4))
    assert 1 + max(row[0] for row in got.schedule) == model.slots == 3 * 4 + 2 - 1
    assert model.bubble < P.transformer_cost("pp", config, B, S, 2, microbatches=4, schedule="1f1b").bubble


@pytest.mark.timeout(240)
@pytest.mark.parametrize("strategy", ["fsdp", "tp", "pp"])
def test_adamw_steps_on_gloo_ranks_equal_one_process(strategy):
    params, tokens, targets = _inputs(GQA, seed=2)
    _adamw_runs(params, GQA, tokens, targets, strategy, 2)


@pytest.mark.timeout(300)
def test_compositions_on_four_gloo_ranks_equal_one_device():
    config = tensorglot.TransformerConfig(**{**GQA.to_dict(), "n_kv_heads": 1})  # kv replicated in each tp row
    for strategy in ("dp_tp", "dp_pp", "fsdp_tp"):
        params, tokens, targets = _inputs(config, seed=4)
        got = tparallel.transformer_step(
            params, config, tokens, targets, strategy=strategy, world_size=4, microbatches=None, timeout=150
        )
        loss, grads = ref.layers.value_and_grad(tokens, targets, params, config)
        np.testing.assert_allclose(got.loss, float(loss), rtol=1e-10, err_msg=strategy)
        for k in params:
            np.testing.assert_allclose(got.grads[k], grads[k], rtol=1e-10, atol=1e-14, err_msg=f"{strategy} {k}")
        model = P.transformer_cost(strategy, config, B, S, 4, dtype="float64")
        assert got.collectives == model.collectives and got.bytes_by_rank == model.bytes_by_rank, strategy
    params, tokens, targets = _inputs(config, seed=8)  # ZB-H1 with a tp all-reduce inside every B
    kw = {"microbatches": 2, "schedule": "zb_h1", "timeout": 150}
    got = tparallel.transformer_step(params, config, tokens, targets, strategy="tp_pp", world_size=4, **kw)
    loss, grads = ref.layers.value_and_grad(tokens, targets, params, config)
    np.testing.assert_allclose(got.loss, float(loss), rtol=1e-10)
    for k in params:
        np.testing.assert_allclose(got.grads[k], grads[k], rtol=1e-10, atol=1e-14, err_msg=f"tp_pp zb_h1 {k}")
    kw.pop("timeout")
    model = P.transformer_cost("tp_pp", config, B, S, 4, dtype="float64", **kw)
    assert got.collectives == model.collectives and got.activation_bytes_by_stage == model.activation_bytes_by_stage
    assert list(got.schedule) == sorted(P.pipeline_schedule("zb_h1", 2, 2))


@pytest.mark.timeout(420)
def test_adamw_under_dp_tp_pp_on_eight_gloo_ranks_equals_one_process():
    """A 2 × 2 × 2 mesh (dp, pp, tp), one kv head replicated in each tp group: three AdamW steps."""
    config = tensorglot.TransformerConfig(**{**GQA.to_dict(), "n_kv_heads": 1})
    params, tokens, targets = _inputs(config, seed=5)
    r = _adamw_runs(params, config, tokens, targets, "dp_tp_pp", 8)
    model = P.transformer_cost("dp_tp_pp", config, B, S, 8, dtype="float64", optimizer="adamw")
    assert r.bytes_by_rank == model.bytes_by_rank and r.optimizer_bytes_per_rank == model.optimizer_bytes_per_rank
    assert list(r.schedule) == sorted(P.pipeline_schedule("1f1b", 2, 2))


@pytest.mark.timeout(180)
def test_a_failing_rank_stops_the_transformer_step_with_its_error(monkeypatch):
    import time

    params, tokens, targets = _inputs(GQA)
    monkeypatch.setenv(tparallel.FAIL_RANK_ENV, "1")  # rank 1 raises at its first all-reduce
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 1 of 2 failed: RuntimeError: injected failure on rank 1"):
        tparallel.transformer_step(params, GQA, tokens, targets, strategy="tp", world_size=2, timeout=60)
    assert time.monotonic() - start < 60
