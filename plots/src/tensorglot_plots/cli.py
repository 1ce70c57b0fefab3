"""``tensorglot plots``: a command added to the core CLI through the plugin hook (the entry point
``cli.plots`` in group ``tensorglot``), so the core needs no matplotlib. This module imports neither
matplotlib nor a framework: `run` does.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from typing import Any

from tensorglot import parallel
from tensorglot.hookspecs import hookimpl

from . import FIGURES

HELP = "regenerate the figures (PNG) with one backend"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default=None, help="backend that computes the figures (default: the selected one)")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory the PNGs are written to")
    parser.add_argument(
        "--only",
        action="append",
        choices=FIGURES,
        metavar="NAME",
        help=f"draw only this figure (repeatable); one of {', '.join(FIGURES)}",
    )


def run(args: argparse.Namespace) -> int:
    import tensorglot

    from . import FigureSkipped, render

    _check_out(args.out)  # before minutes of figures, not after
    name = tensorglot.registry.resolve_name(args.backend)
    parallel.request_host_devices(name, 4)  # the measured sharding panel runs 4-way steps
    backend = tensorglot.get_backend(name)
    names = [n for n in FIGURES if not args.only or n in args.only]
    print(f"tensorglot plots: backend {backend.name}, {len(names)} figure(s) into {args.out}", flush=True)
    written = skipped = 0
    for i, name in enumerate(names, 1):
        prefix = f"[{i:>{len(str(len(names)))}}/{len(names)}] {name:20}"
        print(prefix, end=" ", flush=True)
        try:
            path, seconds = render(name, backend, args.out)
        except FigureSkipped as exc:
            print(f"skipped: {exc}", flush=True)
            skipped += 1
            continue
        print(f"wrote {path} ({seconds:.1f} s)", flush=True)
        written += 1
    print(f"tensorglot plots: {written} written, {skipped} skipped")
    return 0


def _check_out(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ValueError(f"plots: cannot write figures to --out {path}: {exc.strerror or exc}") from None


@hookimpl
def tensorglot_register_commands(register: Callable[..., Any]) -> None:
    register("plots", HELP, configure, run)
