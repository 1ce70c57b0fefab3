"""``tensorglot bench``: the benchmark harness every backend's table runs in.

A backend exposes ``backend.bench``, a module with ``rows(*, quick: bool = False) -> Iterable[Row]``.
Each row is a ratio against a baseline timed **in the same process** (our softmax vs torch.softmax),
or a rate against this machine's measured peak — never an absolute time compared with a constant.
Times are medians of ``repeats`` (>= 5) runs after warm-up. The header holds the machine's float32
matmul rate and memory bandwidth, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class Row:
    """One line of a bench table. ``ratio`` is ours ÷ baseline for times (lower is better) unless
    ``unit`` says otherwise; ``met`` is whether ``target`` holds (None when there is no target)."""

    name: str
    value: float
    unit: str
    ratio: float | None = None
    target: str | None = None
    met: bool | None = None
    sizes: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def time_median(
    fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1, sync: Callable[[], Any] | None = None
) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired_medians(ours: Callable[[], Any], baseline: Callable[[], Any], *, repeats: int = 5) -> tuple[float, float]:
    """Medians of ``repeats`` runs each after a warm-up, the two alternating so that a change in the
    load of the (shared) machine hits both alike."""
    ours()
    baseline()
    t_ours, t_base = [], []
    for _ in range(repeats):
        t_ours.append(time_median(ours, repeats=1, warmup=0))
        t_base.append(time_median(baseline, repeats=1, warmup=0))
    return statistics.median(t_ours), statistics.median(t_base)


def ratio_row(name: str, ours: float, baseline: float, *, limit: float, sizes: dict[str, Any], note: str = "") -> Row:
    """A time ratio ours/baseline with the target ``<= limit``."""
    r = ours / baseline
    return Row(name, ours, "s", ratio=r, target=f"<= {limit}", met=r <= limit, sizes=sizes, note=note)


def measure_machine(*, n: int = 1024, mb: int = 256, repeats: int = 5) -> dict[str, float]:
    """This machine's float32 matmul rate (GFLOP/s) and copy bandwidth (GB/s, read + write), via NumPy."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    t_mm = time_median(lambda: a @ b, repeats=repeats)
    src = np.ones(mb * 2**20 // 4, dtype=np.float32)
    dst = np.empty_like(src)
    t_copy = time_median(lambda: np.copyto(dst, src), repeats=repeats)
    return {"matmul_gflops": 2 * n**3 / t_mm / 1e9, "bandwidth_gbs": 2 * src.nbytes / t_copy / 1e9}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default=None, help="backend to benchmark (default: the selected one)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the rows as JSON to PATH")
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (for smoke tests)")


def run_rows(backend: Any, *, quick: bool = False) -> Iterable[Row]:
    module = getattr(backend, "bench", None)
    if module is None:
        raise ValueError(f"bench: backend {backend.name!r} has no benchmark table")
    yield from module.rows(quick=quick)


def format_table(rows: list[Row]) -> str:
    lines = [f"{'name':46} {'value':>12} {'unit':8} {'ratio':>8} {'target':>9} {'met':>4}  sizes"]
    for r in rows:
        ratio = f"{r.ratio:8.3f}" if r.ratio is not None else " " * 8
        met = {True: "yes", False: "NO", None: ""}[r.met]
        sizes = " ".join(f"{k}={v}" for k, v in r.sizes.items())
        lines.append(f"{r.name:46} {r.value:12.5g} {r.unit:8} {ratio} {r.target or '':>9} {met:>4}  {sizes}")
        if r.note:
            lines.append(f"{'':46}   note: {r.note}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import tensorglot

    from .parallel import request_host_devices
    from .registry import resolve_name

    name = resolve_name(args.backend)
    request_host_devices(name, 2)  # the parallel rows run 2-way steps
    backend = tensorglot.get_backend(name)
    machine = measure_machine(repeats=3 if args.quick else 5)
    print(
        f"tensorglot bench: backend {backend.name}; this machine: float32 matmul "
        f"{machine['matmul_gflops']:.1f} GFLOP/s, copy bandwidth {machine['bandwidth_gbs']:.1f} GB/s"
    )
    rows: list[Row] = [
        Row("machine.matmul_float32", machine["matmul_gflops"], "GFLOP/s", sizes={"n": 1024}),
        Row("machine.copy_bandwidth", machine["bandwidth_gbs"], "GB/s", sizes={"MiB": 256}),
    ]
    try:
        from tqdm import tqdm

        progress: Iterable[Row] = tqdm(
            run_rows(backend, quick=args.quick), desc=f"bench {backend.name}", unit="row", file=sys.stderr
        )
    except ImportError:
        progress = run_rows(backend, quick=args.quick)
    rows.extend(progress)
    print(format_table(rows))
    if args.json:
        payload = [dict(asdict(r), backend=backend.name) for r in rows]
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=2)
        print(f"wrote {len(rows)} rows to {args.json}")
    return 0
