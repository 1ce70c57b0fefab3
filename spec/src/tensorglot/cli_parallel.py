"""``tensorglot parallel``: run a strategy's training step on a backend and compare it with one device.

Prints, per strategy: max |error| against the backend's one-device step, measured vs modelled bytes per
device, parameter bytes per rank, and time per step (the median of ``--repeats`` steps after a warm-up, so
that starting processes and compiling are not counted) against the same step on one device.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
from collections.abc import Callable
from typing import Any

from . import parallel as spec
from .cli import positive_int, positive_seconds
from .registry import resolve_name


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default=None, help="backend to run (default: the selected one)")
    parser.add_argument("--model", choices=("mlp", "transformer"), default="mlp", help="what one step trains")
    parser.add_argument("--strategy", default="all", help=f"one of {', '.join(spec.STRATEGIES)}, or all")
    parser.add_argument("--world-size", type=int, default=2, help="devices (ranks) to split the step over")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--d-ff", type=int, default=256)
    parser.add_argument("--microbatches", type=int, default=4, help="pp's microbatches")
    parser.add_argument(
        "--schedule",
        choices=spec.PIPELINE_SCHEDULES,
        default="1f1b",
        help="pp's schedule (interleaved and zb_h1: --model transformer only)",
    )
    parser.add_argument(
        "--chunks", type=positive_int, default=None, help="virtual stages per device of the interleaved schedule"
    )
    parser.add_argument("--tp-size", type=int, default=None, help="dp_tp's tensor-parallel size")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument(
        "--timeout", type=positive_seconds, default=300.0, help="seconds before started ranks are killed"
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=5, help="steps timed after a warm-up (the median counts)"
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list, one object per strategy")


def collect(args: argparse.Namespace) -> list[dict[str, Any]]:
    import tensorglot

    if args.strategy != "all" and args.strategy not in spec.STRATEGIES:
        raise ValueError(
            f"parallel: unknown strategy {args.strategy!r}, wanted one of {', '.join(spec.STRATEGIES)} or all"
        )
    if args.schedule not in spec.SCHEDULES or args.chunks is not None:
        raise ValueError(
            f"parallel: the MLP's pipeline runs {' or '.join(spec.SCHEDULES)} without --chunks; got --schedule "
            f"{args.schedule}{'' if args.chunks is None else f' --chunks {args.chunks}'} (use --model transformer)"
        )
    shape = spec.MLPShape(args.layers, args.batch, args.d_model, args.d_ff, args.dtype)
    name = resolve_name(args.backend)
    spec.request_host_devices(name, args.world_size)
    backend = tensorglot.get_backend(name)
    wanted = spec.STRATEGIES if args.strategy == "all" else (args.strategy,)
    strategies = [s for s in wanted if all(c in backend.capabilities for c in spec.STRATEGY_CAPABILITIES[s])]
    if not strategies:
        raise ValueError(f"parallel: backend {backend.name!r} has none of the strategies {', '.join(wanted)}")
    options = {"microbatches": args.microbatches, "schedule": args.schedule, "tp_size": args.tp_size}
    for s in strategies:  # every bad input is reported before anything starts
        spec.check_step(s, shape, args.world_size, **options)
    params, x, dy = spec.init_mlp(shape)
    params = {k: backend.asarray(v, args.dtype) for k, v in params.items()}
    x, dy = backend.asarray(x, args.dtype), backend.asarray(dy, args.dtype)
    backend.parallel.single_step(params, x, dy)  # warm-up (compiles, on jit backends)
    one, one_seconds = _timed(lambda: backend.parallel.single_step(params, x, dy), args.repeats)
    rows = []
    for s in strategies:
        kw = dict(strategy=s, world_size=args.world_size, timeout=args.timeout, **options)
        backend.parallel.step(params, x, dy, **kw)  # warm-up: starts the ranks or compiles
        got, seconds = _timed(functools.partial(backend.parallel.step, params, x, dy, **kw), args.repeats)
        model = spec.step_cost(s, shape, args.world_size, **options)
        rows.append(
            {
                "backend": backend.name,
                "strategy": s,
                "world_size": args.world_size,
                "dtype": args.dtype,
                "max_abs_error": spec.max_abs_difference(got, one),
                "bytes_per_device_measured": got.bytes_per_device,
                "bytes_per_device_model": model.bytes_per_device,
                "bytes_by_rank_measured": list(got.bytes_by_rank),
                "param_bytes_per_rank": got.param_bytes_per_rank,
                "param_bytes_per_rank_model": model.param_bytes_per_rank,
                "seconds_per_step": seconds,
                "seconds_per_step_one_device": one_seconds,
                "bubble": model.bubble,
            }
        )
    return rows


def _timed(step: Callable[[], spec.StepResult], repeats: int) -> tuple[spec.StepResult, float]:
    """The last of ``repeats`` steps and their median seconds; only the seconds of the others are kept
    (a StepResult holds every gradient and parameter: 60 of them are gigabytes)."""
    seconds = []
    for _ in range(repeats):
        last = step()
        seconds.append(last.seconds)
    return last, statistics.median(seconds)


def run(args: argparse.Namespace) -> int:
    if args.model == "transformer":
        from .parallel import transformer_report

        return transformer_report.run(args)
    rows = collect(args)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    r0 = rows[0]
    print(
        f"tensorglot parallel: backend {r0['backend']}, {args.world_size} devices, L={args.layers} B={args.batch} "
        f"D={args.d_model} F={args.d_ff} {args.dtype}; pp: {args.microbatches} microbatches, {args.schedule}"
    )
    header = ("strategy", "max|err|", "bytes/dev measured", "model", "param bytes/rank", "s/step", "vs 1 device")
    table = [header] + [
        (
            r["strategy"],
            f"{r['max_abs_error']:.2g}",
            str(r["bytes_per_device_measured"]),
            str(r["bytes_per_device_model"]),
            str(r["param_bytes_per_rank"]),
            f"{r['seconds_per_step']:.3g}",
            f"{r['seconds_per_step'] / r['seconds_per_step_one_device']:.2f}x",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    mismatched = [r["strategy"] for r in rows if r["bytes_per_device_measured"] != r["bytes_per_device_model"]]
    if mismatched:
        print(f"measured bytes differ from the model for: {', '.join(mismatched)}")
    return 0
