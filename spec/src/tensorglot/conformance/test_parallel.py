"""Parallel strategies: a sharded step equals the one-device step, and its bytes equal the cost model.

For every strategy the backend declares (capabilities dp, tp, fsdp, pp; dp_tp needs dp and tp), on
n = 2 and 4 devices. A backend that starts processes must finish within the test's timeout.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import pytest

from tensorglot import parallel as spec

from ._harness import TOLERANCES, assert_close

WORLD_SIZES = (2, 4)
SHAPE = spec.MLPShape(layers=4, batch=16, d_model=8, d_ff=16)
# (strategy, options): pp under both schedules, dp_tp on the (n/2, 2) mesh.
RUNS: list[tuple[str, dict[str, Any]]] = [
    ("dp", {}),
    ("tp", {}),
    ("fsdp", {}),
    ("pp", {"microbatches": 4, "schedule": "gpipe"}),
    ("pp", {"microbatches": 4, "schedule": "1f1b"}),
    ("dp_tp", {"tp_size": 2}),
]
IDS = [f"{s}-{o['schedule']}" if s == "pp" else s for s, o in RUNS]
TIMEOUT = 300  # seconds per test: the first step on n processes pays for starting them

_RESULTS: dict[tuple[Any, ...], Any] = {}


@pytest.fixture(scope="module", autouse=True)
def _release_ranks(backend):
    """A backend may keep its ranks between steps (``parallel.shutdown()`` releases them): free them after."""
    yield
    _RESULTS.clear()
    shutdown = getattr(backend.parallel, "shutdown", None)
    if shutdown is not None:
        shutdown()


def _need(backend: Any, strategy: str, n: int) -> None:
    missing = [c for c in spec.STRATEGY_CAPABILITIES[strategy] if c not in backend.capabilities]
    if missing:
        pytest.skip(f"backend {backend.name!r} lacks capability {missing[0]!r}")
    limit = backend.parallel.max_world_size()
    if limit is not None and n > limit:
        pytest.fail(
            f"backend {backend.name!r} has {limit} devices, the suite needs {n} "
            "(JAX on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=4 before it starts)"
        )


def _inputs(harness: Any, dtype: str) -> tuple[dict[str, Any], Any, Any]:
    params, x, dy = spec.init_mlp(SHAPE, seed=6)
    return {k: harness.put(v, dtype) for k, v in params.items()}, harness.put(x, dtype), harness.put(dy, dtype)


def _step(harness: Any, strategy: str, n: int, options: dict[str, Any], dtype: str = "float32") -> Any:
    key = (harness.backend.name, strategy, n, tuple(sorted(options.items())), dtype)
    if key not in _RESULTS:
        params, x, dy = _inputs(harness, dtype)
        _RESULTS[key] = harness.backend.parallel.step(
            params, x, dy, strategy=strategy, world_size=n, lr=0.1, timeout=TIMEOUT - 30, **options
        )
    return _RESULTS[key]


def _reference(harness: Any, dtype: str) -> Any:
    """The one-device step in float64 on the values the backend saw (rounded to dtype)."""
    params, x, dy = spec.init_mlp(SHAPE, seed=6)
    r = harness.rounded
    return harness.reference.parallel.single_step(
        {k: r(v, dtype) for k, v in params.items()}, r(x, dtype), r(dy, dtype), lr=0.1
    )


def _assert_same_step(got: Any, want: Any, dtype: str, scale: float, what: str) -> None:
    assert_close(got.output, want.output, dtype, scale=scale, what=f"{what} output")
    assert_close(got.input_grad, want.input_grad, dtype, scale=scale, what=f"{what} input gradient")
    assert sorted(got.grads) == sorted(want.grads) == sorted(got.params)
    for k in want.grads:
        assert_close(got.grads[k], want.grads[k], dtype, scale=scale, what=f"{what} gradient {k}")
        assert_close(got.params[k], want.params[k], dtype, scale=scale, what=f"{what} updated {k}")


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("strategy,options", RUNS, ids=IDS)
@pytest.mark.parametrize("n", WORLD_SIZES)
def test_sharded_step_equals_one_device(backend, harness, strategy, options, n):
    _need(backend, strategy, n)
    got = _step(harness, strategy, n, options)
    _assert_same_step(got, _reference(harness, "float32"), "float32", 1.0, f"{strategy} on {n}")


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("strategy,options", RUNS, ids=IDS)
@pytest.mark.parametrize("n", WORLD_SIZES)
def test_measured_bytes_equal_cost_model(backend, harness, strategy, options, n):
    _need(backend, strategy, n)
    got = _step(harness, strategy, n, options)
    model = spec.step_cost(strategy, SHAPE, n, **options)
    assert got.bytes_by_rank == model.bytes_by_rank, (
        f"{strategy} on {n}: measured bytes per rank {got.bytes_by_rank} != model {model.bytes_by_rank}; "
        f"busiest rank's collectives: {[(c.kind, c.size_bytes, c.group_size) for c in got.collectives]}"
    )
    assert got.bytes_per_device == model.bytes_per_device
    assert sum(c.bytes_per_device for c in got.collectives) == model.bytes_per_device


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("strategy,options", RUNS, ids=IDS)
@pytest.mark.parametrize("n", WORLD_SIZES)
def test_param_bytes_per_rank_equal_cost_model(backend, harness, strategy, options, n):
    _need(backend, strategy, n)
    got = _step(harness, strategy, n, options)
    assert got.param_bytes_per_rank == spec.step_cost(strategy, SHAPE, n, **options).param_bytes_per_rank
    if strategy == "fsdp":
        assert got.param_bytes_per_rank * n == SHAPE.param_bytes


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("n", WORLD_SIZES)
def test_gpipe_and_1f1b_compute_the_same_step(backend, harness, n):
    _need(backend, "pp", n)
    a = _step(harness, "pp", n, {"microbatches": 4, "schedule": "gpipe"})
    b = _step(harness, "pp", n, {"microbatches": 4, "schedule": "1f1b"})
    # The schedules reorder the same microbatch sums: equal to float32 rounding.
    _assert_same_step(b, a, "float32", 1.0, f"1f1b vs gpipe on {n}")


@pytest.mark.requires("bfloat16")
@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("strategy,options", RUNS, ids=IDS)
def test_bfloat16_step_equals_one_device(backend, harness, strategy, options):
    _need(backend, strategy, 2)
    got = _step(harness, strategy, 2, options, "bfloat16")
    want = _reference(harness, "bfloat16")
    rtol, _ = TOLERANCES["bfloat16"]
    # Normwise, not elementwise: a weight gradient sums B products, each rounded to bfloat16, so its error
    # scales with the terms, and entries that cancel to near zero fail any elementwise relative test.
    # ×8: the 4 layers each round their output (and every communicated partial sum) to bfloat16, and
    # relu's derivative flips where a rounded pre-activation changes sign: the one-device bfloat16 step
    # itself is ~6.5% (normwise) from float64 on this input gradient.
    pairs = [("output", got.output, want.output), ("input gradient", got.input_grad, want.input_grad)]
    pairs += [(f"gradient {k}", got.grads[k], want.grads[k]) for k in want.grads]
    pairs += [(f"updated {k}", got.params[k], want.params[k]) for k in want.params]
    for what, a, b in pairs:
        err = float(np.max(np.abs(np.asarray(a, np.float64) - b)))
        assert err <= 8 * rtol * float(np.max(np.abs(b))), f"bfloat16 {strategy} {what}: max error {err:.3g}"


def _any_parallel(backend: Any) -> None:
    if not {"dp", "tp", "fsdp", "pp"} & backend.capabilities:
        pytest.skip(f"backend {backend.name!r} lacks capability 'dp'")


@pytest.mark.parametrize("name", spec.NAMES)
def test_parallel_signature_matches_spec(backend, name):
    _any_parallel(backend)
    impl = getattr(backend.parallel, name, None)
    assert impl is not None, f"backend {backend.name!r} lacks parallel.{name}"
    want = [
        (p.name, p.kind, p.default)
        for p in list(inspect.signature(getattr(spec.Parallel, name)).parameters.values())[1:]
    ]
    got = [(p.name, p.kind, p.default) for p in inspect.signature(impl).parameters.values()]
    assert got == want, f"parallel.{name}: signature {got} differs from the spec's {want}"


BAD = [
    ("dp", {"world_size": 3}, "batch = 16 divisible by world_size = 3"),
    ("fsdp", {"world_size": 32}, "batch = 16 divisible by world_size = 32"),
    ("tp", {"world_size": 3}, "d_ff = 16 divisible by world_size = 3"),
    ("pp", {"world_size": 3}, "layers = 4 divisible by world_size = 3"),
    ("pp", {"world_size": 2, "microbatches": 3}, "batch = 16 divisible by microbatches = 3"),
    ("pp", {"world_size": 2, "microbatches": 4, "schedule": "zigzag"}, "unknown schedule 'zigzag'"),
    ("dp_tp", {"world_size": 4, "tp_size": 3}, "tp_size dividing world_size = 4"),
    ("zero", {"world_size": 2}, "unknown strategy 'zero'"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("strategy,kwargs,message", BAD, ids=[f"{s}-{m.split()[0]}" for s, _, m in BAD])
def test_bad_input_raises_before_starting(backend, harness, strategy, kwargs, message):
    _any_parallel(backend)
    params, x, dy = _inputs(harness, "float32")
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        # timeout 5: a backend that started processes before checking would take longer than the raise
        backend.parallel.step(params, x, dy, strategy=strategy, timeout=5, **kwargs)


def test_bad_param_shape_names_the_parameter(backend, harness):
    _any_parallel(backend)
    params, x, dy = _inputs(harness, "float32")
    params["layers.1.w_out"] = harness.put(np.zeros((SHAPE.d_ff + 1, SHAPE.d_model)), "float32")
    with pytest.raises(ValueError, match=r"layers\.1\.w_out has shape \(17, 8\), wanted \(F, D\) = \(16, 8\)"):
        backend.parallel.step(params, x, dy, strategy="dp", world_size=2)


def test_a_timeout_that_is_not_positive_raises_before_starting(backend, harness):
    _any_parallel(backend)
    params, x, dy = _inputs(harness, "float32")
    with pytest.raises(ValueError, match=r"parallel: timeout must be a positive number of seconds, got 0"):
        backend.parallel.step(params, x, dy, strategy="dp", world_size=2, timeout=0)


@pytest.mark.timeout(120)
def test_a_step_past_its_timeout_raises_naming_the_strategy(backend, harness):
    _need(backend, "fsdp", 2)
    params, x, dy = _inputs(harness, "float32")
    # A microsecond: no backend starts, compiles or runs a step in it, so the deadline always passes first.
    with pytest.raises(TimeoutError, match=r"parallel: fsdp on 2 .* did not finish in 1e-06 s"):
        backend.parallel.step(params, x, dy, strategy="fsdp", world_size=2, timeout=1e-6)
