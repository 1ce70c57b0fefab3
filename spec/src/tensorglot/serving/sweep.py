"""Goodput against the arrival rate, disaggregated and colocated, on the same requests (``tensorglot bench
serve``; the numbers and the figure of docs/serving.md).

For each rate, `loadgen.workload` draws the requests — Poisson gaps and random token-id prompts from the
seed, so every rate sends the same prompts and the same arrival pattern scaled by 1/rate — and each mode
serves them in batch mode (`tensorglot.serving.serve`, one thread per process): ``colocated`` (prefill
and decode in one process with chunked prefill, the fair baseline), ``1p1d`` (one prefill worker and one
decode worker), ``2p1d`` (two prefill workers), ``1p2d`` (two decode workers). Every request generates
exactly ``max_tokens`` greedy tokens, as the load generator's ``ignore_eos`` requests do. With ``http``
(``--http``) each mode is instead a ``tensorglot serve --port`` server started for it (`LocalServer`:
``--prefill-chunk`` for colocated, the in-process engine; ``--prefill-workers``/``--decode-workers`` for
the others), sent the same requests by the load generator, so the times are the client's and ITL is
timed for every mode (the batch decode worker reports only a request's first and last token). Each
(mode, rate) gives one `goodput.summarize` row; the ratio goodput(disaggregated) ÷ goodput(colocated) is
reported per rate and for the best goodput each mode reaches over the sweep, at the one stated (TTFT,
TPOT) SLO. With a URL, the load generator sends the same requests to a running server instead.

JSON (schema ``tensorglot.bench.serve/1``)::

    {"schema", "machine": {"date", "platform", "cpus", "loadavg_before", "loadavg_after"},
     "workload": {"backend", "model", "requests", "prompt_len", "max_tokens", "seed", "prefill_chunk", "http"},
     "slo": {"ttft_s", "tpot_s"}, "modes": {mode: label},
     "rows": [{"mode", "rate", <goodput.summarize keys>, "same_tokens"}],
     "ratios": [{"mode", "rate", "goodput_ratio"}], "best": {mode: goodput_rps}, "best_ratio": {mode: ratio},
     "servers": {mode: {"args", "exit", "killed"}}}   # http only: each server's flags and exit status

``--repeats K`` (or `combine` of K sweeps): every number of a row is the median over the K runs, each row
adds ``"runs": {"goodput_rps": [...], "slo_attainment": [...]}``, and the top level ``"repeats": K`` and
``"best_ratio_runs": {mode: [each run's best ratio]}``; ``machine.loadavg_runs`` is each run's load.
"""

from __future__ import annotations

import datetime
import os
import platform
from collections.abc import Callable
from typing import Any

import numpy as np

from . import goodput, loadgen
from .admission import Request
from .model import DEMO_MODEL, Model

SCHEMA = "tensorglot.bench.serve/1"
#: mode -> (prefill workers, decode workers); None: colocated
MODES: dict[str, tuple[int, int] | None] = {"colocated": None, "1p1d": (1, 1), "2p1d": (2, 1), "1p2d": (1, 2)}


def default_modes(cpus: int | None = None) -> list[str]:
    """Colocated and 1P1D; 2P1D too when the machine has a core for each of its four processes."""
    cpus = os.cpu_count() if cpus is None else cpus
    return ["colocated", "1p1d"] + (["2p1d"] if (cpus or 1) >= 4 else [])


def label(mode: str, chunk: int | None) -> str:
    workers = MODES[mode]
    if workers is None:
        return "colocated" + (f", chunked prefill of {chunk}" if chunk else "")
    return f"disaggregated {workers[0]}P{workers[1]}D"


def _machine() -> dict[str, Any]:
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "platform": platform.platform(),
            "cpus": os.cpu_count(), "loadavg_before": list(os.getloadavg())}  # fmt: skip


def _ratios(rows: list[dict[str, Any]], modes: list[str]) -> dict[str, Any]:
    """goodput(mode) ÷ goodput(colocated) per rate, and of the best goodput over the rates."""
    by = {(r["mode"], r["rate"]): r["goodput_rps"] for r in rows}
    best = {m: max(r["goodput_rps"] for r in rows if r["mode"] == m) for m in modes}
    out: dict[str, Any] = {"ratios": [], "best": best, "best_ratio": {}}
    if "colocated" not in modes:
        return out
    for m in (m for m in modes if m != "colocated"):
        for rate in sorted({r["rate"] for r in rows}):
            c = by[("colocated", rate)]
            out["ratios"].append({"mode": m, "rate": rate, "goodput_ratio": by[(m, rate)] / c if c else None})
        out["best_ratio"][m] = best[m] / best["colocated"] if best["colocated"] else None
    return out


def run_sweep(
    rates: list[float],
    *,
    modes: list[str],
    requests: int,
    prompt_len: tuple[int, int],
    max_tokens: int,
    slo_ttft: float,
    slo_tpot: float,
    backend: str = "numpy",
    checkpoint: str | None = None,
    prefill_chunk: int | None = 64,
    seed: int = 0,
    deadline_s: float = 600.0,
    repeats: int = 1,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    http: bool = False,
) -> dict[str, Any]:
    """Serve each rate's requests in each mode, the whole sweep ``repeats`` times (then `combine`d); the
    sweep as the module's JSON describes it. ``http``: each mode is a ``tensorglot serve --port`` server
    started for it, driven by the load generator, instead of a batch run."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"run_sweep: repeats must be an int >= 1, got {repeats!r}")
    kw: dict[str, Any] = dict(
        modes=modes, requests=requests, prompt_len=prompt_len, max_tokens=max_tokens, slo_ttft=slo_ttft,
        slo_tpot=slo_tpot, backend=backend, checkpoint=checkpoint, prefill_chunk=prefill_chunk, seed=seed,
        deadline_s=deadline_s, on_row=on_row, http=http,
    )  # fmt: skip
    runs = [_run_once(rates, **kw) for _ in range(repeats)]
    return runs[0] if repeats == 1 else combine(runs)


def _run_once(
    rates: list[float], *, modes: list[str], requests: int, prompt_len: tuple[int, int], max_tokens: int,
    slo_ttft: float, slo_tpot: float, backend: str, checkpoint: str | None, prefill_chunk: int | None, seed: int,
    deadline_s: float, on_row: Callable[[dict[str, Any]], None] | None, http: bool = False,
) -> dict[str, Any]:  # fmt: skip
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"run_sweep: modes must be among {', '.join(MODES)}, got {modes!r}")
    if checkpoint:
        model = Model(backend, checkpoint=checkpoint)
        vocab, described = model.load_config().vocab_size, checkpoint
    else:
        model, vocab, described = Model(backend, DEMO_MODEL, seed=seed), DEMO_MODEL["vocab_size"], "DEMO_MODEL"
    machine = _machine()
    kw: dict[str, Any] = dict(requests=requests, prompt_len=prompt_len, max_tokens=max_tokens, slo_ttft=slo_ttft,
                              slo_tpot=slo_tpot, vocab=vocab, seed=seed, prefill_chunk=prefill_chunk,
                              deadline_s=deadline_s, on_row=on_row)  # fmt: skip
    servers: dict[str, Any] = {}
    cells = _cells_http(rates, modes, model, servers, **kw) if http else _cells_batch(rates, modes, model, **kw)
    rows = []
    for rate in rates:  # rate-major, as combine and the figure read them
        same = all(cells[m, rate][1] == cells[modes[0], rate][1] for m in modes)
        rows += [cells[m, rate][0] | {"same_tokens": same} for m in modes]
    machine["loadavg_after"] = list(os.getloadavg())
    workload = {"backend": backend, "model": described, "requests": requests, "prompt_len": list(prompt_len),
                "max_tokens": max_tokens, "seed": seed, "prefill_chunk": prefill_chunk, "http": http}  # fmt: skip
    return {"schema": SCHEMA, "machine": machine, "workload": workload, "slo": {"ttft_s": slo_ttft, "tpot_s": slo_tpot},
            "modes": {m: label(m, prefill_chunk) for m in modes}, "rows": rows, **_ratios(rows, modes),
            **({"servers": servers} if http else {})}  # fmt: skip


#: (mode, rate) -> (its summary row, every request's generated token ids)
Cells = dict[tuple[str, float], tuple[dict[str, Any], list[list[int]]]]


def _cells_batch(
    rates: list[float], modes: list[str], model: Model, *, requests: int, prompt_len: tuple[int, int],
    max_tokens: int, slo_ttft: float, slo_tpot: float, vocab: int, seed: int, prefill_chunk: int | None,
    deadline_s: float, on_row: Callable[[dict[str, Any]], None] | None,
) -> Cells:  # fmt: skip
    """Each rate's requests served by `serve` in each mode (server-side times)."""
    from . import serve

    cells: Cells = {}
    for rate in rates:
        gaps, prompts = loadgen.workload(requests, rate, prompt_len=prompt_len, vocab=vocab, seed=seed)
        arrival = gaps.cumsum()
        for mode in modes:
            reqs = [Request(i, p, max_tokens, arrival_s=float(arrival[i])) for i, p in enumerate(prompts)]
            workers = MODES[mode]
            out = serve(
                reqs, model, colocated=workers is None, prefill_workers=(workers or (1, 1))[0],
                decode_workers=(workers or (1, 1))[1], prefill_chunk=prefill_chunk if workers is None else None,
                deadline_s=deadline_s,
            )  # fmt: skip
            records = out["requests"]
            lat = [goodput.from_record(r) for r in records]
            row = {"mode": mode, "rate": rate}
            row |= goodput.summarize(lat, out["summary"]["wall_s"], slo_ttft=slo_ttft, slo_tpot=slo_tpot)
            cells[mode, rate] = row, [r["tokens"] for r in records]
            if on_row is not None:
                on_row(row)
    return cells


def server_args(mode: str, model: Model, prefill_chunk: int | None) -> list[str]:
    """``tensorglot serve`` flags (without ``--port``) that serve ``model`` in ``mode``: colocated is the
    in-process engine with chunked prefill, a disaggregated mode the router over worker processes."""
    args = ["--backend", model.backend, "--seed", str(model.seed), "--dtype", model.dtype]
    args += ["--checkpoint", model.checkpoint] if model.checkpoint else []
    workers = MODES[mode]
    if workers is None:
        return args + (["--prefill-chunk", str(prefill_chunk)] if prefill_chunk else [])
    return [*args, "--prefill-workers", str(workers[0]), "--decode-workers", str(workers[1])]


def _cells_http(
    rates: list[float], modes: list[str], model: Model, servers: dict[str, Any], *, requests: int,
    prompt_len: tuple[int, int], max_tokens: int, slo_ttft: float, slo_tpot: float, vocab: int, seed: int,
    prefill_chunk: int | None, deadline_s: float, on_row: Callable[[dict[str, Any]], None] | None,
) -> Cells:  # fmt: skip
    """For each mode a server of its own (`LocalServer`), every rate's requests sent by the load generator
    (client-side times, ITL from the streamed chunks); ``servers`` gets each one's flags and exit."""
    import asyncio

    from .local_server import LocalServer

    cells: Cells = {}
    send: dict[str, Any] = dict(
        prompt_len=prompt_len, max_tokens=max_tokens, vocab=vocab, seed=seed, timeout_s=deadline_s
    )
    for mode in modes:
        args = server_args(mode, model, prefill_chunk)
        with LocalServer(args, startup_s=min(deadline_s, 300.0)) as srv:
            name = loadgen.model_card(srv.url)["id"]
            # one short request first, so no rate pays the first step's allocations
            asyncio.run(loadgen.run_rate(srv.url, 1e6, requests=1, model=name, **send | {"prompt_len": (8, 8)}))
            for rate in rates:
                records, wall = asyncio.run(loadgen.run_rate(srv.url, rate, requests=requests, model=name, **send))
                row = {"mode": mode, "rate": rate} | loadgen.summarize(records, wall, slo_ttft=slo_ttft,
                                                                        slo_tpot=slo_tpot)  # fmt: skip
                cells[mode, rate] = row, [r.ids for r in records]
                if on_row is not None:
                    on_row(row)
        servers[mode] = {"args": args, "exit": srv.returncode, "killed": srv.killed}
    return cells


def _median(values: list[Any]) -> Any:
    numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if not numbers:
        return None
    m = float(np.median(numbers))
    return int(m) if all(isinstance(v, int) for v in numbers) and m.is_integer() else m


def combine(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Sweeps of one workload as one: each row's numbers are the medians over the runs (its ``runs`` keeps
    every run's goodput and attainment), the ratios are of those medians, ``best_ratio_runs`` has each run's."""
    if not results:
        raise ValueError("combine: wanted at least one sweep, got none")
    first = results[0]

    def shape(r: dict[str, Any]) -> Any:
        return r["workload"], r["slo"], r["modes"], [(x["mode"], x["rate"]) for x in r["rows"]]

    for i, r in enumerate(results[1:], 1):
        if shape(r) != shape(first):
            raise ValueError(f"combine: sweep {i} differs from sweep 0 in its workload, SLO, modes or rates")
    rows = []
    for i, row in enumerate(first["rows"]):
        runs = [r["rows"][i] for r in results]
        out: dict[str, Any] = {"mode": row["mode"], "rate": row["rate"]}
        for key in row:
            if key not in out:
                out[key] = _median([x[key] for x in runs])
        out["errors"] = sorted({e for x in runs for e in x["errors"]})[:3]
        out["same_tokens"] = all(x["same_tokens"] for x in runs)
        out["runs"] = {k: [x[k] for x in runs] for k in ("goodput_rps", "slo_attainment")}
        rows.append(out)
    machine = first["machine"] | {"loadavg_after": results[-1]["machine"]["loadavg_after"],
                                  "loadavg_runs": [r["machine"]["loadavg_before"][0] for r in results]}  # fmt: skip
    best_runs = {m: [r["best_ratio"].get(m) for r in results] for m in first["best_ratio"]}
    servers = {"servers": {  # each server's first non-zero exit over the runs, killed if ever
        m: s | {"exit": next((r["servers"][m]["exit"] for r in results if r["servers"][m]["exit"]), s["exit"]),
                "killed": any(r["servers"][m]["killed"] for r in results)}
        for m, s in first["servers"].items()
    }} if "servers" in first else {}  # fmt: skip
    return first | {"machine": machine, "repeats": len(results), "rows": rows, **_ratios(rows, list(first["modes"])),
                    "best_ratio_runs": best_runs, **servers}  # fmt: skip


def run_url(
    url: str, rates: list[float], *, requests: int, prompt_len: tuple[int, int], max_tokens: int, slo_ttft: float,
    slo_tpot: float, model: str | None = None, seed: int = 0, timeout_s: float = 300.0,
) -> dict[str, Any]:  # fmt: skip
    """The load generator against a running server (mode ``url``), in the same JSON."""
    card = loadgen.model_card(url)
    machine = _machine()
    rows = loadgen.sweep(
        url, rates, slo_ttft=slo_ttft, slo_tpot=slo_tpot, requests=requests, prompt_len=prompt_len,
        max_tokens=max_tokens, vocab=int(card.get("vocab_size", 256)), model=model or card["id"], seed=seed,
        timeout_s=timeout_s,
    )  # fmt: skip
    rows = [{"mode": "url"} | r for r in rows]
    machine["loadavg_after"] = list(os.getloadavg())
    workload = {"url": url, "model": model or card["id"], "requests": requests, "prompt_len": list(prompt_len),
                "max_tokens": max_tokens, "seed": seed}  # fmt: skip
    return {"schema": SCHEMA, "machine": machine, "workload": workload, "slo": {"ttft_s": slo_ttft, "tpot_s": slo_tpot},
            "modes": {"url": url}, "rows": rows, **_ratios(rows, ["url"])}  # fmt: skip


def report(result: dict[str, Any]) -> str:
    """The table, and the ratios at the stated SLO."""
    slo = result["slo"]
    lines = [goodput.table(result["rows"], slo["ttft_s"], slo["tpot_s"], label="mode")]
    lines += [f"  {m}: {text}" for m, text in result["modes"].items()]
    if len(result["modes"]) > 1:
        differ = sorted({r["rate"] for r in result["rows"] if not r["same_tokens"]})
        lines.append("same tokens in every mode" if not differ else f"tokens DIFFER across modes at {differ} req/s")
    for m, srv in result.get("servers", {}).items():
        how = "killed after SIGTERM" if srv["killed"] else f"exit {srv['exit']} after SIGTERM"
        lines.append(f"  {m} server: tensorglot serve {' '.join(srv['args'])}: {how}")
    for m, ratio in result["best_ratio"].items():
        per_rate = ", ".join(
            f"{r['rate']:g}/s {'-' if r['goodput_ratio'] is None else format(r['goodput_ratio'], '.2f')}"
            for r in result["ratios"] if r["mode"] == m
        )  # fmt: skip
        best = "-" if ratio is None else f"{ratio:.2f}"
        lines.append(f"goodput {m} ÷ colocated: best over the sweep {best}; per rate {per_rate}")
        if "best_ratio_runs" in result:
            each = ", ".join("-" if r is None else f"{r:.2f}" for r in result["best_ratio_runs"][m])
            lines.append(f"  medians of {result['repeats']} runs; each run's best ratio: {each}")
    load = result["machine"]
    lines.append(f"{load['cpus']} CPUs, load average {load['loadavg_before'][0]:.1f} before, "
                 f"{load['loadavg_after'][0]:.1f} after")  # fmt: skip
    return "\n".join(lines)
