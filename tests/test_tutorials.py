"""Every tutorial in docs/tutorials runs: its ```python blocks, top to bottom, in one fresh interpreter.

JAX tutorials get 8 fake CPU devices (XLA_FLAGS must be set before jax initialises, hence a subprocess).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).resolve().parents[1] / "docs" / "tutorials").glob("*.md"))
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def extract(path: Path) -> str:
    blocks = BLOCK.findall(path.read_text())
    assert blocks, f"{path.name} has no python blocks"
    return "\n".join(blocks)


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(path, tmp_path):
    framework = path.stem.split("_")[0]
    if framework in ("jax", "torch") and importlib.util.find_spec(framework) is None:
        pytest.skip(f"the {framework} tutorial needs {framework} installed (pip install tensorglot-{framework})")
    script = tmp_path / f"{path.stem}.py"
    script.write_text(extract(path))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env.pop("TENSORGLOT_BACKEND", None)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600, check=False
    )
    assert result.returncode == 0, f"{path.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
