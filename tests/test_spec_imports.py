"""The spec imports no backend or plot package: every module under spec/src/tensorglot, every import
statement (at the top, inside functions, under ``if TYPE_CHECKING``) and every ``importlib.import_module``
/ ``__import__`` of a string literal."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SPEC = Path(__file__).resolve().parents[1] / "spec" / "src" / "tensorglot"
FORBIDDEN = ("tensorglot_numpy", "tensorglot_torch", "tensorglot_jax", "tensorglot_xp", "tensorglot_plots")


def forbidden_imports(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    """(line, module) of each import of a FORBIDDEN package in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        found += [(node.lineno, n) for n in names if n.split(".")[0] in FORBIDDEN]
    return found


def test_the_walk_finds_imports_anywhere():
    source = (
        "import os\nimport tensorglot_jax as j\n"
        "def f():\n    from tensorglot_torch.serving import x\n"
        "    return importlib.import_module('tensorglot_xp.ops')\n"
        "from tensorglot_numpyish import y\nfrom .tensorglot_plots import z\n"
    )
    assert forbidden_imports(source) == [
        (2, "tensorglot_jax"),
        (4, "tensorglot_torch.serving"),
        (5, "tensorglot_xp.ops"),
    ]


@pytest.mark.parametrize("path", sorted(SPEC.rglob("*.py")), ids=lambda p: str(p.relative_to(SPEC)))
def test_no_spec_module_imports_a_backend(path):
    assert forbidden_imports(path.read_text(), str(path)) == []
