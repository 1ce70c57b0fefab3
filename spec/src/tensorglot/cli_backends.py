"""``tensorglot backends``: a table (or ``--json``) of installed backends; imports no framework."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .registry import registry


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def collect() -> dict[str, Any]:
    reg = registry()
    rows = [
        {
            "name": info.name,
            "distribution": info.distribution,
            "version": info.version,
            "framework": info.framework,
            "framework_version": info.framework_version(),
            "capabilities": sorted(info.capabilities),
            "plugin": info.plugin,
        }
        for info in reg.infos().values()
    ]
    errors = [{"plugin": e.plugin, "distribution": e.distribution, "error": e.message} for e in reg.errors]
    return {"backends": sorted(rows, key=lambda r: r["name"]), "errors": errors}


def run(args: argparse.Namespace) -> int:
    data = collect()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    header = ("name", "distribution", "version", "framework", "capabilities")
    table = [header] + [
        (
            r["name"],
            r["distribution"] or "-",
            r["version"] or "-",
            f"{r['framework']} {r['framework_version'] or '(not installed)'}" if r["framework"] else "-",
            ", ".join(r["capabilities"]) or "-",
        )
        for r in data["backends"]
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    if not data["backends"]:
        print("(no backends installed: pip install tensorglot-numpy)")
    for err in data["errors"]:
        print(f"load error: {err['plugin']} ({err['distribution']}): {err['error']}")
    return 0
