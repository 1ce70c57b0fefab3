"""``tensorglot bench serve``: goodput against the arrival rate, disaggregated ÷ colocated with chunked
prefill on the same requests (`tensorglot.serving.sweep`) in batch runs or, with ``--http``, over servers
it starts; or the load generator against a running OpenAI-compatible server (``--url``). Prints the table
and the ratio at the stated SLO; ``--json PATH`` writes the sweep (the plots' ``serving_goodput`` figure draws it)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..cli import positive_int, positive_seconds

HELP = "goodput vs arrival rate: disaggregated and colocated serving, or a running server (--url)"


def _rates(text: str) -> list[float]:
    try:
        rates = [float(r) for r in text.split(",")]
    except ValueError:
        rates = []
    if not rates or not all(0 < r < float("inf") for r in rates):
        raise argparse.ArgumentTypeError(f"wanted positive requests/s, comma-separated, got {text!r}")
    return rates


def _modes(text: str) -> list[str]:
    from ..serving.sweep import MODES

    modes = [m.strip() for m in text.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        raise argparse.ArgumentTypeError(f"wanted modes among {', '.join(MODES)}, comma-separated, got {text!r}")
    return modes


def configure(parser: argparse.ArgumentParser) -> None:
    from ..serving.cli import _range

    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", help="a running OpenAI-compatible server: run the load generator against it")
    where.add_argument(
        "--http", action="store_true", help="start a tensorglot serve --port server per mode, load it over HTTP"
    )
    parser.add_argument("--model", help="with --url: the model id to send (default: the server's first)")
    parser.add_argument("--backend", default="numpy", help="the backend that runs the model (default numpy)")
    parser.add_argument("--checkpoint", metavar="DIR", help="a Hugging Face checkpoint (default: DEMO_MODEL)")
    parser.add_argument("--modes", type=_modes, metavar="M,...",
                        help="of colocated, 1p1d, 2p1d, 1p2d (default colocated,1p1d; 2p1d too, 4+ CPUs)")  # fmt: skip
    parser.add_argument("--rates", type=_rates, default=[1.0, 2.0, 4.0], metavar="R,...", help="requests/s")
    parser.add_argument("--requests", type=positive_int, default=24, metavar="N", help="requests per rate")
    parser.add_argument(
        "--prompt-len",
        type=lambda t: _range(t, "--prompt-len"),
        default=(16, 256),
        metavar="A:B",
        help="uniform in [A, B]",
    )
    parser.add_argument("--max-tokens", type=positive_int, default=32, metavar="N", help="tokens per request")
    parser.add_argument("--prefill-chunk", type=positive_int, default=64, metavar="T", help="colocated's chunk")
    parser.add_argument("--slo-ttft", type=positive_seconds, default=0.5, metavar="S", help="TTFT target (s)")
    parser.add_argument("--slo-tpot", type=positive_seconds, default=0.05, metavar="S", help="TPOT target (s)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the arrivals, the prompts and the model")
    parser.add_argument("--repeats", type=positive_int, default=1, metavar="K", help="run the sweep K times: medians")
    parser.add_argument("--deadline", type=positive_seconds, default=600.0, metavar="S", help="per run (s)")
    parser.add_argument("--json", metavar="PATH", help="also write the sweep as JSON to PATH")


def _progress(row: dict[str, Any]) -> None:
    print(f"  {row['mode']} at {row['rate']:g}/s: goodput {row['goodput_rps']:.2f} req/s", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from ..serving import sweep
    from .cli import _check_writable

    if args.json:  # fail before minutes of runs, not after
        _check_writable(args.json)
    common: dict[str, Any] = dict(requests=args.requests, prompt_len=args.prompt_len, max_tokens=args.max_tokens,
                                  slo_ttft=args.slo_ttft, slo_tpot=args.slo_tpot, seed=args.seed)  # fmt: skip
    if args.url:
        result = sweep.run_url(args.url, args.rates, model=args.model, **common)
    else:
        modes = args.modes or sweep.default_modes()
        how = "HTTP servers" if args.http else "batch runs"
        labels = ", ".join(sweep.label(m, args.prefill_chunk) for m in modes)
        print(f"tensorglot bench serve: {labels} ({how}); backend {args.backend}; {len(args.rates)} rates x "
              f"{args.requests} requests", file=sys.stderr)  # fmt: skip
        result = sweep.run_sweep(
            args.rates, modes=modes, backend=args.backend, checkpoint=args.checkpoint,
            prefill_chunk=args.prefill_chunk, deadline_s=args.deadline, repeats=args.repeats,
            on_row=_progress, http=args.http, **common,
        )  # fmt: skip
    print(sweep.report(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
        print(f"wrote {len(result['rows'])} rows to {args.json}")
    return 0
