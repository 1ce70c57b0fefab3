"""The NumPy bench table runs in --quick mode and holds the rows the issue asks for (no timed assertions)."""

from __future__ import annotations

from typing import Any

import pytest

import tensorglot
import tensorglot_numpy.bench as bench


@pytest.mark.slow
def test_quick_bench_table_has_every_row():
    backend: Any = tensorglot.get_backend("numpy")
    assert backend.bench is bench  # what `tensorglot bench --backend numpy` runs
    rows = list(bench.rows(quick=True))
    names = [r.name for r in rows]
    for op in ("softmax", "linear", "mlp", "swiglu", "rms_norm", "attention", "rope"):
        assert f"{op} forward+backward" in names
    assert "mlp train step FLOP/s ÷ matmul FLOP/s" in names
    generate = next(r for r in rows if r.name.startswith("generate: no-cache"))
    assert generate.met is True and "tokens identical: yes" in generate.note  # quick mode: no speed target
    assert all(r.value > 0 for r in rows)
