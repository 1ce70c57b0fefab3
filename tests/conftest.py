"""Helpers for the cross-package tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run_python(code: str, *, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (so imports and environment start clean)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORGLOT_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=timeout, check=False
    )


@pytest.fixture
def run_python():
    """``run_python(code, env=..., timeout=...)``: a fresh interpreter, without TENSORGLOT_* from outside."""
    return _run_python


@pytest.fixture
def fake_distribution(tmp_path):
    """Write an installed-looking distribution with entry points in the ``tensorglot`` group.

    Returns a function ``make(name, entry_points: dict[str, str], modules: dict[str, str]) -> path``;
    put the path on PYTHONPATH of a subprocess and importlib.metadata finds it.
    """

    def make(dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> Path:
        info = tmp_path / f"{dist.replace('-', '_')}-0.0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.0.1\n")
        lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
        (info / "entry_points.txt").write_text(f"[tensorglot]\n{lines}\n")
        for module, source in modules.items():
            (tmp_path / f"{module}.py").write_text(source)
        return tmp_path

    return make
