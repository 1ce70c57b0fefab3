"""docs/layers.md's example (the README's) runs as written."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "layers.md"


def test_the_layers_example_runs():
    blocks = re.findall(r"^```python\n(.*?)^```", DOC.read_text(), re.S | re.M)
    assert blocks, "docs/layers.md has no python block"
    namespace: dict[str, object] = {}
    exec(compile("\n".join(blocks), str(DOC), "exec"), namespace)
    assert namespace["logits"].shape == (1, 4, 256)  # type: ignore[attr-defined]
    assert namespace["out"].shape == (1, 12)  # type: ignore[attr-defined]
