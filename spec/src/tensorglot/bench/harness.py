"""Timing, the machine header, and what a backend's plugin contributes to a run (see `tensorglot.bench`)."""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Row:
    name: str
    value: float | None  # None: skipped, details["skipped"] says why
    unit: str
    ratio: float | None = None  # value / baseline["value"]
    target: str | None = None  # on the ratio: "<= 1.3", ">= 0.7"
    met: bool | None = None
    baseline: dict[str, Any] | None = None  # {"name": what ran, "value": in `unit`}
    details: dict[str, Any] = field(default_factory=dict)


def timings(*fns: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> list[list[float]]:
    """Seconds of each of ``fns``, run in turn ``repeats`` times after ``warmup`` rounds, so that a change
    in the (shared) machine's load falls on all of them alike."""
    out: list[list[float]] = [[] for _ in fns]
    for r in range(warmup + repeats):
        for fn, ts in zip(fns, out):
            start = time.perf_counter()
            fn()
            if r >= warmup:
                ts.append(time.perf_counter() - start)
    return out


def paired_medians(*fns: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> list[float]:
    return [statistics.median(ts) for ts in timings(*fns, repeats=repeats, warmup=warmup)]


def measure_machine(*, n: int = 1024, mb: int = 256, repeats: int = 5) -> dict[str, float]:
    """This machine's float32 matmul rate (GFLOP/s) and copy bandwidth (GB/s, read + write), via NumPy."""
    a, b = np.random.default_rng(0).standard_normal((2, n, n), dtype=np.float32)
    src = np.ones(mb * 2**20 // 4, dtype=np.float32)
    dst = np.empty_like(src)
    t_mm, t_copy = paired_medians(lambda: a @ b, lambda: np.copyto(dst, src), repeats=repeats)
    return {"matmul_gflops": 2 * n**3 / t_mm / 1e9, "bandwidth_gbs": 2 * src.nbytes / t_copy / 1e9}


def tracemalloc_peak(fn: Callable[..., Any], *args: Any) -> int:
    """Peak bytes allocated during ``fn(*args)``, for libraries that report to tracemalloc (NumPy does)."""
    tracemalloc.start()
    try:
        fn(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field))


def _rss_peak_here(fn: Callable[..., Any], native: Callable[[np.ndarray], Any], arrays: list[np.ndarray]) -> int:
    args = [native(a) for a in arrays]
    fn(*args)  # first-call set-up (thread pools, kernels' buffers) is not the function's memory
    before = _status_kib("VmRSS:")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets the high-water mark VmHWM to the current RSS
    fn(*args)
    return (_status_kib("VmHWM:") - before) * 1024


def rss_peak(fn: Callable[..., Any], native: Callable[[np.ndarray], Any], arrays: list[np.ndarray]) -> int:
    """Bytes the resident set grows by at the peak of ``fn(*[native(a) for a in arrays])`` (Linux), for a
    library whose allocator tracemalloc does not see. Measured in a fresh process whose malloc maps and
    unmaps every large buffer (``MALLOC_MMAP_THRESHOLD_``), so no pages kept from the warm-up or earlier
    work hide the peak; ``fn`` and ``native`` must be picklable."""
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by the child's malloc only: this one has started
    try:
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            return pool.submit(_rss_peak_here, fn, native, arrays).result()
    finally:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]


class Context:
    """One run on ``backend`` with its plugin's baselines and probes; ``quick`` sizes are too small for the
    targets, so quick rows carry none."""

    def __init__(self, backend: Any, *, quick: bool = False) -> None:
        from ..registry import registry

        self.be, self.quick, self.repeats = backend, quick, 5 if quick else 7
        self.extra: dict[str, Any] = {}
        hook = registry()._manager().hook.tensorglot_register_bench_baselines  # what the plugins contribute
        hook(register=lambda name, loader: self.extra.update(loader()) if name == backend.name else None)
        self.sync: Callable[[Any], Any] = self.extra.get("sync", lambda out: out)
        self.jit: Callable[[Callable[..., Any]], Callable[..., Any]] = self.extra.get("jit", lambda f: f)
        self.peak_memory: Callable[..., int] = self.extra.get("peak_memory", tracemalloc_peak)

    def arrays(self, *shapes: tuple[int, ...], seed: int = 0) -> list[Any]:
        rng = np.random.default_rng(seed)
        return [self.be.asarray(rng.standard_normal(s, dtype=np.float32), "float32") for s in shapes]

    def call(self, fn: Callable[..., Any], *args: Any, jit: bool = True) -> Callable[[], Any]:
        """``fn(*args)`` compiled as the framework compiles (``jit``) and waited for (``sync``)."""
        f = self.jit(fn) if jit else fn
        return lambda: self.sync(f(*args))

    def row(self, name: str, value: float, unit: str, *, baseline: tuple[str, float] | None = None,
            target: str | None = None, same: bool = True, **details: Any) -> Row:  # fmt: skip
        """A row; ``same=False`` (the two sides computed different results) fails it whatever the times."""
        ratio = value / baseline[1] if baseline and baseline[1] else None
        target = None if self.quick or ratio is None else target
        op, limit = (target or "<= inf").split()
        met = None if ratio is None or not target else (ratio <= float(limit) if op == "<=" else ratio >= float(limit))
        base = {"name": baseline[0], "value": baseline[1]} if baseline else None
        return Row(name, value, unit, ratio, target, met if same else False, base, details)

    def timed(self, name: str, fn: Callable[..., Any], *args: Any, target: str | None = None, jit: bool = True,
              **details: Any) -> Row:  # fmt: skip
        """Seconds of ``fn(*args)``, alternated with the backend's baseline for ``name`` when it has one."""
        runs = [self.call(fn, *args, jit=jit)]
        label, make = self.extra.get(name, (None, None))
        if make is not None:
            try:
                base = make(*args)
                self.sync(base())  # compiles outside the timing
                runs.append(lambda: self.sync(base()))
            except Exception as exc:  # e.g. torch.compile without a toolchain: the table says so
                details["baseline_error"] = f"{label}: {type(exc).__name__}: {exc}"[:160]
        t = paired_medians(*runs, repeats=self.repeats)
        return self.row(name, t[0], "s", baseline=(label, t[1]) if len(t) > 1 else None, target=target, **details)

    def skipped(self, name: str, reason: str) -> Row:
        return Row(name, None, "", details={"skipped": reason})
