"""The ``tensorglot`` command.

Built-in subcommands: ``backends`` (what is installed, imports no framework), ``bench`` and
``parallel``. Plugins add more through the ``tensorglot_register_commands`` hook (``tensorglot plots``
comes from tensorglot-plots, ``tensorglot serve`` from tensorglot-torch, which provides its transport),
so the core needs neither matplotlib nor any framework. Each built-in lives in its
own module as ``configure(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tensorglot", description=__doc__.split("\n\n")[0])
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
    try:
        code = args._run(args)
    except (ValueError, TypeError, RuntimeError) as exc:
        print(f"tensorglot {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    raise SystemExit(main())
