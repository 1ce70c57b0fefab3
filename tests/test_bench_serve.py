"""``tensorglot bench serve``: a tiny sweep (2 rates x 3 requests of `DEMO_MODEL`) served colocated with
chunked prefill and disaggregated 1P1D gives the same tokens in both, rows that `goodput.summarize`
would give, and ratios of those rows; ``--url`` drives a running server; ``tensorglot bench`` without
``serve`` is unchanged. The disaggregated runs need a transport (tensorglot-torch's) and skip without."""

from __future__ import annotations

import json
from typing import Any

import pytest

import tensorglot
from tensorglot.cli import main
from tensorglot.registry import registry
from tensorglot.serving import sweep

needs_transport = pytest.mark.skipif(
    not registry().transports(), reason="needs a serving transport (tensorglot-torch provides one)"
)
TINY = ["--rates", "5,40", "--requests", "3", "--prompt-len", "8:80", "--max-tokens", "4", "--prefill-chunk", "32"]
LOOSE = ["--slo-ttft", "60", "--slo-tpot", "10"]  # met on a loaded machine too, so no goodput is 0


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory: Any) -> tuple[dict[str, Any], str]:
    if not registry().transports():
        pytest.skip("needs a serving transport (tensorglot-torch provides one)")
    return _bench(tmp_path_factory.mktemp("sweep"), "--modes", "colocated,1p1d", *TINY, *LOOSE)


def _bench(directory: Any, *flags: str) -> tuple[dict[str, Any], str]:
    """``tensorglot bench serve *flags --json``: the sweep it wrote and what it printed."""
    import contextlib
    import io

    path, out = directory / "sweep.json", io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["bench", "serve", *flags, "--json", str(path)]) == 0
    return json.loads(path.read_text()), out.getvalue()


@needs_transport
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_the_sweep_serves_the_same_requests_with_the_same_tokens_in_both_modes(tiny_sweep):
    result, printed = tiny_sweep
    assert result["schema"] == sweep.SCHEMA
    assert [(r["mode"], r["rate"]) for r in result["rows"]] == [
        ("colocated", 5.0), ("1p1d", 5.0), ("colocated", 40.0), ("1p1d", 40.0)
    ]  # fmt: skip
    for r in result["rows"]:
        assert r["same_tokens"] and r["requests"] == 3 and r["completed"] == 3 and r["errors"] == []
        assert r["tokens_per_s"] == pytest.approx(3 * 4 / r["wall_s"])  # every request made its 4 tokens
        assert r["goodput_rps"] == pytest.approx(r["slo_attainment"] * 3 / r["wall_s"]) and r["goodput_rps"] > 0
    colocated = [r for r in result["rows"] if r["mode"] == "colocated"]
    assert all(r["itl_p50_s"] is not None for r in colocated)  # the colocated loop times every token
    assert result["modes"] == {"colocated": "colocated, chunked prefill of 32", "1p1d": "disaggregated 1P1D"}
    assert result["workload"]["prompt_len"] == [8, 80] and result["slo"] == {"ttft_s": 60, "tpot_s": 10}
    assert "SLO: TTFT <= 60000 ms and TPOT <= 10000 ms" in printed and "goodput 1p1d ÷ colocated" in printed
    assert "load average" in printed and "wrote 4 rows to" in printed


@needs_transport
def test_the_ratios_are_of_the_rows(tiny_sweep):
    result, _ = tiny_sweep
    good = {(r["mode"], r["rate"]): r["goodput_rps"] for r in result["rows"]}
    for r in result["ratios"]:
        assert r["goodput_ratio"] == pytest.approx(good[("1p1d", r["rate"])] / good[("colocated", r["rate"])])
    best = {m: max(v for (mode, _), v in good.items() if mode == m) for m in ("colocated", "1p1d")}
    assert result["best"] == pytest.approx(best)
    assert result["best_ratio"]["1p1d"] == pytest.approx(best["1p1d"] / best["colocated"])


def test_ratios_by_hand_and_a_colocated_goodput_of_zero():
    good = {("colocated", 1.0): 0.5, ("1p1d", 1.0): 1.0, ("colocated", 2.0): 0.0, ("1p1d", 2.0): 1.5}
    rows = [{"mode": m, "rate": rate, "goodput_rps": g} for (m, rate), g in good.items()]
    out = sweep._ratios(rows, ["colocated", "1p1d"])
    assert out["ratios"] == [{"mode": "1p1d", "rate": 1.0, "goodput_ratio": 2.0},
                             {"mode": "1p1d", "rate": 2.0, "goodput_ratio": None}]  # fmt: skip
    assert out["best"] == {"colocated": 0.5, "1p1d": 1.5} and out["best_ratio"] == {"1p1d": 3.0}


def test_default_modes_add_2p1d_only_with_a_core_per_process():
    assert sweep.default_modes(2) == ["colocated", "1p1d"]
    assert sweep.default_modes(16) == ["colocated", "1p1d", "2p1d"]


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--rates", "1,0"], "argument --rates: wanted positive requests/s, comma-separated, got '1,0'"),
        (["--modes", "colocated,3p1d"], "wanted modes among colocated, 1p1d, 2p1d"),
        (["--prompt-len", "9:3"], "--prompt-len must satisfy 1 <= A <= B"),
        (["--slo-ttft", "0"], "argument --slo-ttft: wanted a positive, finite number of seconds"),
    ],
)
def test_bad_flags_are_one_line(flags, message, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "serve", *flags])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_bench_without_serve_keeps_its_flags(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--only", "nope"])
    assert "unknown row group" in capsys.readouterr().err
    args = tensorglot.cli.build_parser().parse_args(["bench", "--backend", "numpy", "--quick", "--only", "ops"])
    assert args.bench_command is None and args.backend == "numpy" and args.only == ["ops"]


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_url_runs_the_load_generator_against_a_running_server(tmp_path, capsys):
    Server = pytest.importorskip("test_server", reason="the server test helpers need the serve extra").Server
    srv = Server(None, "--prefill-chunk", "32")
    try:
        path = tmp_path / "url.json"
        assert main(["bench", "serve", "--url", srv.url, *TINY, "--json", str(path)]) == 0
    finally:
        assert srv.stop() == 0
    result = json.loads(path.read_text())
    assert [r["mode"] for r in result["rows"]] == ["url", "url"] and result["modes"] == {"url": srv.url}
    for r in result["rows"]:
        assert r["completed"] == 3 and r["tokens_per_s"] == pytest.approx(3 * 4 / r["wall_s"])
        assert r["itl_p50_s"] is not None  # streamed: the client times every chunk


def _fake_sweep(goodputs: list[float], load: float) -> dict[str, Any]:
    rows = [
        {"mode": m, "rate": rate, "completed": 3, "goodput_rps": g, "slo_attainment": g / 4, "tokens_per_s": 9.0,
         "errors": [f"e{g}"] if g == 0 else [], "same_tokens": True}
        | dict.fromkeys(("ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "itl_p50_s", "itl_p99_s"))
        for (m, rate), g in zip([("colocated", 1.0), ("1p1d", 1.0), ("colocated", 2.0), ("1p1d", 2.0)], goodputs)
    ]  # fmt: skip
    modes = {"colocated": "c", "1p1d": "d"}
    return {"schema": sweep.SCHEMA, "machine": {"loadavg_before": [load], "loadavg_after": [load + 1]},
            "workload": {"requests": 3}, "slo": {"ttft_s": 1, "tpot_s": 1}, "modes": modes, "rows": rows,
            **sweep._ratios(rows, list(modes))}  # fmt: skip


def test_combine_takes_medians_keeps_every_run_and_refuses_different_sweeps():
    runs = [_fake_sweep([1, 2, 0, 1], 5), _fake_sweep([3, 1, 2, 4], 7), _fake_sweep([2, 3, 1, 2], 9)]
    out = sweep.combine(runs)
    assert [r["goodput_rps"] for r in out["rows"]] == [2, 2, 1, 2] and out["repeats"] == 3
    assert out["rows"][2]["runs"] == {"goodput_rps": [0, 2, 1], "slo_attainment": [0, 0.5, 0.25]}
    assert out["rows"][0]["completed"] == 3 and out["rows"][0]["itl_p50_s"] is None
    assert out["rows"][2]["errors"] == ["e0"] and all(r["same_tokens"] for r in out["rows"])
    assert out["best_ratio"] == {"1p1d": 1.0} and out["best_ratio_runs"] == {"1p1d": [2.0, 4 / 3, 1.5]}
    assert out["machine"]["loadavg_runs"] == [5, 7, 9] and out["machine"]["loadavg_after"] == [10]
    assert "each run's best ratio: 2.00, 1.33, 1.50" in sweep.report(out | {"machine": out["machine"] | {"cpus": 2}})
    servers = [{"c": {"args": [], "exit": e, "killed": k}} for e, k in ((0, False), (-9, True), (0, False))]
    out = sweep.combine([r | {"servers": srv} for r, srv in zip(runs, servers)])
    assert out["servers"] == {"c": {"args": [], "exit": -9, "killed": True}}  # a bad exit in any run shows
    other = _fake_sweep([1, 2, 3, 4], 5)
    other["rows"][3]["rate"] = 3.0
    with pytest.raises(ValueError, match="sweep 1 differs from sweep 0"):
        sweep.combine([runs[0], other])


def _serves_http() -> None:
    for module in ("starlette", "uvicorn", "httpx"):
        pytest.importorskip(module, reason=f"the HTTP server and its load generator need {module}")


@pytest.fixture(scope="module")
def http_sweep(tmp_path_factory: Any) -> tuple[dict[str, Any], str]:
    _serves_http()
    if not registry().transports():
        pytest.skip("needs a serving transport (tensorglot-torch provides one)")
    flags = ["--rates", "5", "--requests", "3", "--prompt-len", "8:80", "--max-tokens", "6", "--prefill-chunk", "32"]
    return _bench(tmp_path_factory.mktemp("http"), "--http", "--modes", "colocated,1p1d", *flags, *LOOSE)


@needs_transport
@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_http_sweep_starts_a_server_per_mode_and_gives_the_same_tokens_with_itl(http_sweep):
    result, printed = http_sweep
    assert result["schema"] == sweep.SCHEMA and result["workload"]["http"] is True
    assert [(r["mode"], r["rate"]) for r in result["rows"]] == [("colocated", 5.0), ("1p1d", 5.0)]
    for r in result["rows"]:
        assert r["same_tokens"] and r["requests"] == 3 and r["completed"] == 3 and r["errors"] == [], (r, printed)
        assert r["tokens_per_s"] == pytest.approx(3 * 6 / r["wall_s"])  # every request streamed its 6 tokens
        assert 0 <= r["slo_attainment"] <= 1
        assert r["goodput_rps"] == pytest.approx(r["slo_attainment"] * 3 / r["wall_s"])
        assert r["goodput_rps"] <= r["requests_per_s"] == pytest.approx(3 / r["wall_s"])
        for metric in ("ttft", "tpot", "itl"):  # ITL from the client's chunks, for the disaggregated mode too
            assert 0 <= r[f"{metric}_p50_s"] <= r[f"{metric}_p99_s"], (r["mode"], metric)
    assert result["servers"]["colocated"]["args"][-2:] == ["--prefill-chunk", "32"]
    assert result["servers"]["1p1d"]["args"][-4:] == ["--prefill-workers", "1", "--decode-workers", "1"]
    assert all(s["exit"] == 0 and not s["killed"] for s in result["servers"].values()), result["servers"]  # drained
    assert "same tokens in every mode" in printed and "goodput 1p1d ÷ colocated" in printed


@pytest.mark.timeout(60)
def test_a_server_that_exits_during_start_up_is_an_error_with_its_output():
    _serves_http()
    from tensorglot.serving.local_server import LocalServer, ServerError

    srv = LocalServer(["--backend", "numpy", "--prefill-chunk", "0"], startup_s=50)
    with pytest.raises(ServerError, match=r"exited with 2 during start-up: .*--prefill-chunk"):
        srv.start()
    assert srv.stop() == 2


def test_server_args_per_mode():
    from tensorglot.serving import DEMO_MODEL, Model

    model = Model("numpy", DEMO_MODEL, seed=3)
    common = ["--backend", "numpy", "--seed", "3", "--dtype", "float32"]
    assert sweep.server_args("colocated", model, 64) == [*common, "--prefill-chunk", "64"]
    assert sweep.server_args("colocated", model, None) == common
    assert sweep.server_args("1p2d", model, 64) == [*common, "--prefill-workers", "1", "--decode-workers", "2"]
    assert sweep.label("1p2d", 64) == "disaggregated 1P2D" and sweep.label("2p1d", None) == "disaggregated 2P1D"
