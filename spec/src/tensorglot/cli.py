"""The ``tensorglot`` command.

Built-in subcommands: ``backends`` (what is installed, imports no framework), ``bench`` and
``parallel``. Plugins add more through the ``tensorglot_register_commands`` hook (``tensorglot plots``
comes from tensorglot-plots, ``tensorglot serve`` from tensorglot-torch, which provides its transport),
so the core needs neither matplotlib nor any framework. Each built-in lives in its
own module as ``configure(parser)`` and ``run(args) -> int``.

Every failure, a usage error included, is one line ``tensorglot <command>: error: ...`` on stderr and
exit status 2 (130 when interrupted): a CLI user cannot act on a traceback.
``TENSORGLOT_TRACEBACK=1`` prints the traceback as well, for a bug report.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn

from . import __version__
from .registry import registry


def _builtins() -> dict[str, tuple[str, object]]:
    from . import bench, cli_backends, cli_parallel

    return {
        "backends": (
            "list the installed backends, their versions, capabilities and load errors",
            cli_backends,
        ),
        "parallel": ("run a parallel strategy's training step: error, bytes per device, time", cli_parallel),
        "bench": (
            "run a backend's benchmark table (ratios against built-ins measured in the same run)",
            bench,
        ),
    }


class _Parser(argparse.ArgumentParser):
    """A usage error is one line too (the subcommands' parsers are of this class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """An argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"wanted a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"wanted a positive int, got {text!r}")
    return value


def positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"wanted a positive number of seconds, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"wanted a positive, finite number of seconds, got {text!r}")
    return value


def _one_line(exc: BaseException) -> str:
    """An exception as one line: our errors name the function and the value; others keep their type."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if not isinstance(exc, ValueError | TypeError | RuntimeError) or not text:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tensorglot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"tensorglot {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (help_text, module) in _builtins().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.configure(p)  # type: ignore[attr-defined]
        p.set_defaults(_run=module.run)  # type: ignore[attr-defined]
    for name, info in sorted(registry().commands().items()):
        if name in _builtins():
            continue
        p = sub.add_parser(name, help=info.help, description=info.help)
        info.configure(p)
        p.set_defaults(_run=info.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int | None] = args._run
    try:
        code = run(args)
    except KeyboardInterrupt:
        print(f"tensorglot {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # every failure is one line (a rank's traceback stays in the exception)
        if os.environ.get("TENSORGLOT_TRACEBACK") == "1":
            traceback.print_exc()
        print(f"tensorglot {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    raise SystemExit(main())
