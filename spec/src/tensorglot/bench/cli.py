"""``tensorglot bench --backend B [--quick] [--only GROUP,...] [--json PATH] [--compare OLD.json]``: the table
of every row, or of the named groups' rows. ``tensorglot bench serve ...``: the serving goodput sweep
(`tensorglot.bench.serve`)."""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import sys
import tempfile
from dataclasses import asdict
from typing import Any

import numpy as np

from .harness import Context, Row, measure_machine
from .rows import GROUPS

SCHEMA = "tensorglot.bench/1"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default=None, help="backend to benchmark (default: the selected one)")
    parser.add_argument("--quick", action="store_true", help="small sizes and no targets (a smoke run)")
    parser.add_argument("--only", metavar="GROUP,...", default=None, type=_groups,
                        help=f"run only these row groups, comma-separated, of: {', '.join(GROUPS)}")  # fmt: skip
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the run as JSON to PATH")
    parser.add_argument("--compare", metavar="OLD.json", default=None, help="print each row's value new ÷ old")
    from . import serve

    sub = parser.add_subparsers(dest="bench_command", title="subcommand (optional)")
    serve.configure(sub.add_parser("serve", help=serve.HELP, description=serve.__doc__.split("\n\n")[0]))


def _groups(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in GROUPS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown row group {unknown or text!r}; pick from {', '.join(GROUPS)}")
    return names


def _check_writable(path: str) -> None:
    existed = os.path.exists(path)
    try:
        open(path, "a").close()
    except OSError as exc:
        raise ValueError(f"bench: cannot write --json {path}: {exc.strerror}") from None
    if not existed:
        os.remove(path)


def _load(path: str) -> dict[str, Any]:
    try:
        with open(path) as fh:
            return dict(json.load(fh))
    except (OSError, ValueError) as exc:
        raise ValueError(f"bench: cannot read --compare {path}: {exc}") from None


def format_table(rows: list[Row]) -> str:
    lines = [f"{'row':36} {'value':>10} {'unit':8} {'baseline':>10} {'ratio':>7} {'target':>8} {'met':>3}  details"]
    for r in rows:
        if r.value is None:
            lines.append(f"{r.name:36} skipped: {r.details['skipped']}")
            continue
        base, ratio = (f"{r.baseline['value']:10.4g}", f"{r.ratio:7.3f}") if r.baseline and r.ratio else ("", "")
        vs = {"vs": r.baseline["name"]} if r.baseline else {}
        about = "; ".join(f"{k} {v}" for k, v in (vs | r.details).items())
        met = {True: "yes", False: "NO", None: ""}[r.met]
        lines.append(f"{r.name:36} {r.value:10.4g} {r.unit:8} {base:>10} {ratio:>7} {r.target or '':>8} {met:>3}  "
                     + about)  # fmt: skip
    return "\n".join(lines)


def format_compare(new: dict[str, Any], old: dict[str, Any]) -> str:
    before = {r["name"]: r["value"] for r in old["rows"]}
    lines = [f"vs {old['backend']['name']} at {old['machine']['date']}: value new ÷ old (times: < 1 is faster)"]
    for r in new["rows"]:
        v, o = r["value"], before.get(r["name"])
        lines.append(f"{r['name']:36} " + (f"{v / o:7.3f}  {o:.4g} -> {v:.4g} {r['unit']}" if v and o else "      -"))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "bench_command", None) == "serve":
        from . import serve

        return serve.run(args)
    import tensorglot

    from ..parallel import request_host_devices
    from ..registry import registry, resolve_name

    if args.json:  # fail before a run of minutes, not after
        _check_writable(args.json)
    old = _load(args.compare) if args.compare else None
    name = resolve_name(args.backend)
    request_host_devices(name, 2)  # the parallel rows run 2-way steps
    ctx = Context(tensorglot.get_backend(name), quick=args.quick)
    m = measure_machine(repeats=3 if args.quick else 5)
    machine = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "platform": platform.platform(),
               "cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__, **m}  # fmt: skip
    info = registry().infos()[name]
    backend = {"name": name, "framework": info.framework, "version": info.framework_version(),
               "repr": repr(ctx.be), "capabilities": sorted(ctx.be.capabilities)}  # fmt: skip
    print(f"tensorglot bench: {ctx.be!r} {backend['version'] or ''}; this machine: float32 matmul "
          f"{m['matmul_gflops']:.1f} GFLOP/s, copy {m['bandwidth_gbs']:.1f} GB/s (NumPy, this run)")  # fmt: skip
    try:
        from tqdm import tqdm  # the "bench" extra
    except ImportError:
        tqdm = None
    groups = [GROUPS[n] for n in args.only] if args.only else list(GROUPS.values())
    every = itertools.chain.from_iterable(group(ctx) for group in groups)
    rows: list[Row] = list(tqdm(every, desc=f"bench {name}", unit="row", file=sys.stderr) if tqdm else every)
    print(format_table(rows))
    payload = {"schema": SCHEMA, "machine": machine, "backend": backend, "quick": args.quick,
               "rows": [asdict(r) for r in rows]}  # fmt: skip
    code = 0
    if args.json:
        code = _write(args.json, payload)
    if old is not None:
        print(format_compare(payload, old))
    return code


def _write(path: str, payload: dict[str, Any]) -> int:
    """Write the run to ``path``; should it fail after all (checked before the run), write it to a
    temporary file instead and say where: a run of minutes is never lost. 1 when ``path`` failed."""
    text = json.dumps(payload, indent=1, default=str)
    try:
        with open(path, "w") as fh:
            fh.write(text)
    except OSError as exc:
        fd, spare = tempfile.mkstemp(prefix="tensorglot-bench-", suffix=".json")
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        print(f"tensorglot bench: error: cannot write --json {path}: {exc.strerror or exc}; the run is in {spare}",
              file=sys.stderr)  # fmt: skip
        return 1
    print(f"wrote {len(payload['rows'])} rows to {path}")
    return 0
