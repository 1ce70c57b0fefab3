"""``tensorglot bench``: every row runs on numpy through the public API, the JSON follows the schema,
``--compare`` divides row by row, a bad ``--json`` fails before anything runs, and the baselines that
plugins contribute compute what our rows compute (else their ratios would mean nothing). No timed
assertion anywhere."""

from __future__ import annotations

import json
import types
from typing import Any

import numpy as np
import pytest

import tensorglot
from tensorglot import bench, parallel
from tensorglot.bench import cli, rows
from tensorglot.cli import main
from tensorglot.hookspecs import hookimpl
from tensorglot.registry import registry

ROW_KEYS = {"name", "value", "unit", "ratio", "target", "met", "baseline", "details"}


@pytest.fixture(scope="module")
def quick_numpy(tmp_path_factory: Any) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("bench") / "numpy.json"
    assert main(["bench", "--backend", "numpy", "--quick", "--json", str(path)]) == 0
    return dict(json.loads(path.read_text()))


def _row(run: dict[str, Any], name: str) -> dict[str, Any]:
    return next(r for r in run["rows"] if r["name"] == name)


@pytest.mark.slow
def test_quick_run_on_numpy_follows_the_schema_with_every_row(quick_numpy: dict[str, Any]) -> None:
    run = quick_numpy
    assert run["schema"] == bench.cli.SCHEMA and run["quick"] is True
    assert {"date", "cpus", "matmul_gflops", "bandwidth_gbs"} <= set(run["machine"])
    assert run["backend"]["name"] == "numpy" and "flash" in run["backend"]["capabilities"]
    names = [r["name"] for r in run["rows"]]
    assert len(names) == len(set(names)) and all(set(r) == ROW_KEYS for r in run["rows"])
    expected = [f"ops.{op}.fwd_bwd" for op in ("softmax", "linear", "mlp", "swiglu", "rms_norm", "attention", "rope")]
    expected += ["mlp.flops_vs_matmul", "flash.time_vs_naive", "flash.peak_memory_vs_naive"]
    expected += ["flash.window.time_vs_causal", "flash.window.peak_memory_vs_causal"]
    expected += ["generate.cached_vs_recompute", "train.value_and_grad"]
    expected += ["serving.prefix.computed_vs_uncached", "serving.prefix.ttft_p50_vs_uncached"]
    expected += [f"parallel.{s}.step_vs_single" for s in parallel.STRATEGIES]
    assert set(expected) <= set(names)
    serving = [f"serving.{label}.disagg_vs_coloc" for _, label, _, _ in rows.SERVING]
    expected += serving if registry().transports() else []  # else skipped: no transport installed
    measured = [r for r in run["rows"] if r["value"] is not None]
    assert {r["name"] for r in measured} == set(expected)
    assert all(r["value"] > 0 and r["target"] is None for r in measured)  # quick rows carry no target
    for r in measured:
        if r["baseline"] is not None:
            assert r["ratio"] == pytest.approx(r["value"] / r["baseline"]["value"])


@pytest.mark.slow
def test_rows_check_what_they_measure(quick_numpy: dict[str, Any]) -> None:
    assert _row(quick_numpy, "generate.cached_vs_recompute")["details"]["same_tokens"] is True
    memory = _row(quick_numpy, "flash.peak_memory_vs_naive")
    assert memory["value"] < memory["baseline"]["value"]  # tiles, not the S x T scores (tracemalloc: exact)
    shape = parallel.MLPShape(layers=4, batch=32, d_model=64, d_ff=256)
    for s in parallel.STRATEGIES:
        details = _row(quick_numpy, f"parallel.{s}.step_vs_single")["details"]
        assert details["bytes_per_device"] == details["model_bytes"] == parallel.step_cost(s, shape, 2, **(
            {"microbatches": 4} if s == "pp" else {})).bytes_per_device  # fmt: skip
    # quick: 4 prompts of 128 shared + 16 own tokens; blocks of 16, so each later prompt finds the 8 shared
    # blocks cached and computes its own 16 tokens
    prefix = _row(quick_numpy, "serving.prefix.computed_vs_uncached")
    assert (prefix["value"], prefix["baseline"]["value"]) == (144 + 3 * 16, 4 * 144)
    assert prefix["details"]["same_tokens"] is True
    if registry().transports():  # numpy's model served over torch's transport: the tokens of generate
        assert _row(quick_numpy, "serving.tpot_p99.disagg_vs_coloc")["details"]["same_tokens"] is True


@pytest.mark.slow
def test_compare_prints_new_over_old_per_row(quick_numpy: dict[str, Any]) -> None:
    old = json.loads(json.dumps(quick_numpy))
    for r in old["rows"]:
        r["value"] = None if r["name"] == "ops.rope.fwd_bwd" else r["value"] and r["value"] / 2
    lines = cli.format_compare(quick_numpy, old).splitlines()
    assert lines[0].startswith("vs numpy at ")
    by_name = {line.split()[0]: line.split()[1] for line in lines[1:]}
    assert by_name["ops.softmax.fwd_bwd"] == "2.000" and by_name["ops.rope.fwd_bwd"] == "-"


@pytest.mark.parametrize("flag", ["--json", "--compare"])
def test_a_bad_path_fails_before_the_run_in_one_line(flag: str, tmp_path: Any, monkeypatch: Any, capsys: Any) -> None:
    def no_run(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the bench started")

    monkeypatch.setattr(cli, "measure_machine", no_run)
    monkeypatch.setattr(cli, "Context", no_run)
    path = tmp_path / "no-such-dir" / "run.json"
    assert main(["bench", "--backend", "numpy", flag, str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and ("cannot write" if flag == "--json" else "cannot read") in err
    assert not path.parent.exists()


class _Plugin:
    """Baselines for numpy, as a backend's plugin registers them: one that works, one that cannot build."""

    @hookimpl
    def tensorglot_register_bench_baselines(self, register: Any) -> None:
        def broken(*args: Any) -> Any:
            raise RuntimeError("no toolchain")

        register("numpy", lambda: {"ops.x.fwd_bwd": ("np.negative", lambda x: lambda: np.negative(x)),
                                   "ops.y.fwd_bwd": ("compiler", broken)})  # fmt: skip
        register("elsewhere", lambda: pytest.fail("a loader for another backend ran"))


def test_baselines_come_from_the_hook_keyed_by_row_and_backend() -> None:
    registry().register_plugin(_Plugin(), name="test-bench-baselines")
    try:
        ctx = bench.Context(tensorglot.get_backend("numpy"), quick=False)
    finally:
        registry().unregister_plugin("test-bench-baselines")
    x = np.ones(1000)
    row = ctx.timed("ops.x.fwd_bwd", np.abs, x, target="<= 100")
    assert row.baseline is not None and row.baseline["name"] == "np.negative" and row.met is not None
    assert row.ratio == pytest.approx(row.value / row.baseline["value"])
    broken = ctx.timed("ops.y.fwd_bwd", np.abs, x, target="<= 100")
    assert broken.baseline is None and broken.met is None and "no toolchain" in broken.details["baseline_error"]
    assert ctx.timed("ops.z.fwd_bwd", np.abs, x).baseline is None
    assert ctx.row("r", 1.0, "s", baseline=("b", 2.0), target="<= 1").met is True
    assert ctx.row("r", 1.0, "s", baseline=("b", 2.0), target="<= 1", same=False).met is False  # other tokens


def test_a_backend_without_a_capability_gets_the_row_skipped_with_the_reason() -> None:
    numpy = tensorglot.get_backend("numpy")
    bare = types.SimpleNamespace(name="numpy", capabilities=frozenset(), parallel=numpy.parallel)
    ctx = bench.Context(bare, quick=True)
    got = [*rows.flash_rows(ctx), *rows.layer_rows(ctx), *rows.parallel_rows(ctx)]
    assert all(r.value is None for r in got) and len(got) == 4 + len(parallel.STRATEGIES)
    assert "'flash'" in got[0].details["skipped"] and "'layers'" in got[2].details["skipped"]
    assert "lacks ['dp']" in got[4].details["skipped"]


def _ours_dx(be: Any, op: str, args: list[Any]) -> Any:
    o = be.ops
    if op == "softmax":
        return o.softmax_backward(o.softmax(args[0]), args[1])
    if op == "linear":
        return o.linear_backward(*args[:2], args[3], bias=True)[0]
    if op == "mlp":
        return o.mlp_backward(*args)[0]
    if op == "rms_norm":
        return o.rms_norm_backward(*args)[0]
    return o.attention_backward(*args, causal=True)[0]


@pytest.mark.parametrize("backend", [b for b in ("torch", "jax") if b in tensorglot.available_backends()])
def test_op_baselines_compute_our_gradients(backend: str) -> None:
    be = tensorglot.get_backend(backend)
    ctx = bench.Context(be, quick=True)
    shapes = {"softmax": [(2, 3, 8, 8)] * 2, "linear": [(6, 8), (8, 5), (5,), (6, 5)],
              "mlp": [(6, 8), (8, 16), (16, 8), (6, 8)], "rms_norm": [(6, 8), (8,), (6, 8)],
              "attention": [(2, 5, 4, 8), (2, 7, 2, 8), (2, 7, 2, 8), (2, 5, 4, 8)]}  # fmt: skip
    checked = 0
    for op, sh in shapes.items():
        if f"ops.{op}.fwd_bwd" not in ctx.extra:
            continue
        args = ctx.arrays(*sh, seed=1)
        out = ctx.extra[f"ops.{op}.fwd_bwd"][1](*args)()
        dx = out[0] if backend == "torch" else out[1][0]  # torch: autograd's grads; jax: (y, vjp)
        np.testing.assert_allclose(be.to_numpy(dx), be.to_numpy(_ours_dx(be, op, args)), rtol=2e-4, atol=2e-5)
        checked += 1
    assert checked >= 3


def test_only_runs_the_named_groups_and_refuses_an_unknown_one(tmp_path: Any, capsys: Any) -> None:
    path = tmp_path / "only.json"
    assert main(["bench", "--backend", "numpy", "--quick", "--only", "flash,mlp", "--json", str(path)]) == 0
    names = {r["name"] for r in json.loads(path.read_text())["rows"]}
    assert names == {"mlp.flops_vs_matmul", "flash.time_vs_naive", "flash.peak_memory_vs_naive"}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--backend", "numpy", "--only", "flash,nope"])
    assert exc.value.code == 2 and "unknown row group ['nope']" in capsys.readouterr().err


def test_the_generate_row_runs_under_the_serial_probe(monkeypatch: Any) -> None:
    entered: list[str] = []

    class Serial:
        def __enter__(self) -> None:
            entered.append("in")

        def __exit__(self, *exc: Any) -> None:
            entered.append("out")

    ctx = bench.Context(tensorglot.get_backend("numpy"), quick=True)
    ctx.extra["serial"] = Serial
    config = rows._config(True)
    t_cached, t_full, same = rows.generate_times(ctx, config, 4, 3, repeats=1, batch=2)
    assert entered == ["in", "out"] and same and t_cached > 0 and t_full > 0


def test_a_serving_row_is_the_median_run_of_each_mode_and_any_other_token_fails_it(monkeypatch: Any) -> None:
    from tensorglot import serving

    if not registry().transports():
        pytest.skip("no serving transport is installed: the serving rows are skipped")
    served: list[bool] = []
    tpot = {False: [0.009, 0.030, 0.007], True: [0.006, 0.005, 0.020]}  # per run: disaggregated, colocated

    def fake_serve(requests: Any, model: Any, *, colocated: bool) -> dict[str, Any]:
        i = sum(1 for c in served if c == colocated)
        served.append(colocated)
        tokens = [[1, 2]] * len(requests) if (colocated, i) != (True, 2) else [[1, 3]] * len(requests)
        summary = {"ttft_p50_s": 1.0, "tpot_p99_s": tpot[colocated][i], "itl_p99_s": 1.0, "tokens_per_s": 1.0}
        return {"requests": [{"tokens": t} for t in tokens], "summary": summary}

    monkeypatch.setattr(serving, "serve", fake_serve)
    ctx = bench.Context(tensorglot.get_backend("numpy"), quick=False)
    got = {r.name: r for r in rows.serving_rows(ctx)}["serving.tpot_p99.disagg_vs_coloc"]
    assert served == [False, True] * rows.SERVING_RUNS  # the modes alternate, run after run
    assert got.value == 0.009 and got.baseline == {"name": "colocated", "value": 0.006}  # the medians
    assert got.details["disaggregated"] == [0.009, 0.03, 0.007] and got.details["runs"] == 3
    assert got.details["same_tokens"] is False and got.met is False  # the last colocated run gave other tokens
