"""SLO attainment and goodput, written once for the load generator (client-side times of an HTTP server)
and for batch runs (`tensorglot serve`'s per-request records): Poisson arrival gaps, percentiles, and one
summary row per run.

A request **attains** the SLO when its TTFT ≤ ``slo_ttft`` and its TPOT ≤ ``slo_tpot`` (a one-token
request has no TPOT and is judged on TTFT alone); **goodput** is attaining requests per second of the
run's wall time (DistServe, Zhong et al. 2024, arXiv:2401.09670); throughput counts every completed one.
A failed request never attains, so attainment is over every request sent.

>>> lat = [Latency(0.1, 0.02, 8), Latency(0.9, 0.01, 8), Latency(0.2, 0.08, 8), Latency(None, None, 0, "boom")]
>>> row = summarize(lat, 2.0, slo_ttft=0.5, slo_tpot=0.05)
>>> row["completed"], row["slo_attainment"], row["goodput_rps"]
(3, 0.25, 0.5)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Latency:
    """What the summary needs of one request: its TTFT and TPOT (s), tokens received, the gaps between
    token arrivals (s; empty when the run did not record them) and its error."""

    ttft: float | None
    tpot: float | None
    tokens: int
    error: str | None = None
    itl: Sequence[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and self.tokens > 0

    def attains(self, slo_ttft: float, slo_tpot: float) -> bool:
        return (
            self.ok and self.ttft is not None and self.ttft <= slo_ttft and (self.tpot is None or self.tpot <= slo_tpot)
        )


def poisson_gaps(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    """``n`` exponential gaps of mean 1/``rate`` s (a Poisson process at ``rate`` requests per second)."""
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate < math.inf:
        raise ValueError(f"poisson_gaps: rate must be a positive, finite number of requests/s, got {rate!r}")
    return rng.exponential(1.0 / rate, size=n)


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q``-th percentile (NumPy's linear interpolation), None for no values."""
    v = list(values)
    return float(np.percentile(v, q)) if v else None


def from_record(record: dict[str, Any]) -> Latency:
    """A batch run's request record (`tensorglot.serving.metrics.request_record` or a rejected one)."""
    return Latency(
        record["ttft_s"], record["tpot_s"], len(record["tokens"]), record["error"], record.get("itl_s") or []
    )


def summarize(latencies: Sequence[Latency], wall_s: float, *, slo_ttft: float, slo_tpot: float) -> dict[str, Any]:
    """One row: TTFT, TPOT and ITL p50/p99, tokens/s, completed requests/s, attainment and goodput."""
    if not wall_s > 0:
        raise ValueError(f"goodput.summarize: wall_s must be > 0, got {wall_s!r}")
    ok = [r for r in latencies if r.ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    tpot = [r.tpot for r in ok if r.tpot is not None]
    itl = [float(g) for r in ok for g in r.itl]
    attained = sum(r.attains(slo_ttft, slo_tpot) for r in latencies)
    return {
        "requests": len(latencies),
        "completed": len(ok),
        "errors": sorted({r.error for r in latencies if r.error})[:3],
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "tpot_p50_s": percentile(tpot, 50),
        "tpot_p99_s": percentile(tpot, 99),
        "itl_p50_s": percentile(itl, 50),
        "itl_p99_s": percentile(itl, 99),
        "tokens_per_s": sum(r.tokens for r in ok) / wall_s,
        "requests_per_s": len(ok) / wall_s,
        "slo_attainment": attained / len(latencies) if latencies else None,
        "goodput_rps": attained / wall_s,
        "wall_s": wall_s,
    }


def table(rows: Sequence[dict[str, Any]], slo_ttft: float, slo_tpot: float, *, label: str = "") -> str:
    """The rows as text, one a line (``label`` names a column taken from each row, e.g. the mode)."""

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{1e3 * x:.0f}"

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.0%}"

    width = max([len(label), *(len(str(r.get(label, ""))) for r in rows)]) if label else 0
    head = (
        f"SLO: TTFT <= {1e3 * slo_ttft:.0f} ms and TPOT <= {1e3 * slo_tpot:.0f} ms\n"
        + (f"{label:<{width}} " if label else "")
        + f"{'rate':>6} {'done':>5} {'ttft p50/p99 ms':>16} {'tpot p50/p99 ms':>16} {'itl p50/p99 ms':>15} "
        f"{'tok/s':>7} {'attain':>7} {'goodput':>8}"
    )
    lines = [head]
    for r in rows:
        lines.append(
            (f"{r[label]!s:<{width}} " if label else "")
            + f"{r['rate']:>6g} {r['completed']:>5} {ms(r['ttft_p50_s']) + '/' + ms(r['ttft_p99_s']):>16} "
            f"{ms(r['tpot_p50_s']) + '/' + ms(r['tpot_p99_s']):>16} "
            f"{ms(r['itl_p50_s']) + '/' + ms(r['itl_p99_s']):>15} "
            f"{r['tokens_per_s']:>7.1f} {pct(r['slo_attainment']):>7} {r['goodput_rps']:>8.2f}"
        )
    return "\n".join(lines)
