"""``tensorglot serve``: disaggregated (or colocated) serving of a batch of requests, with metrics.

A plugin that provides a transport registers this command (tensorglot-torch does, through
``tensorglot_register_commands``); the model runs on ``--backend``, whatever the transport. Without
``--checkpoint`` the seeded random model `DEMO_MODEL` is served; prompts are random ids of lengths
drawn from ``--prompt-len A:B`` unless ``--prompts FILE`` (a JSON list of token-id lists) gives them.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from ..cli import positive_int, positive_seconds
from . import serve
from .admission import Request
from .goodput import poisson_gaps
from .model import DEMO_MODEL, Model

HELP = "serve requests with prefill and decode workers over a plugin's transport, print metrics"


def _range(text: str, name: str) -> tuple[int, int]:
    try:
        lo, _, hi = text.partition(":")
        a, b = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} must be N or A:B with ints, got {text!r}") from None
    if not 1 <= a <= b:
        raise argparse.ArgumentTypeError(f"{name} must satisfy 1 <= A <= B, got {text!r}")
    return a, b


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default="torch", help="the backend that runs the model (default torch)")
    parser.add_argument("--prefill-workers", type=positive_int, metavar="P", help="prefill processes (default 1)")
    parser.add_argument("--decode-workers", type=positive_int, metavar="M", help="decode processes (default 1)")
    parser.add_argument("--requests", type=positive_int, default=8, metavar="R", help="how many requests")
    parser.add_argument(
        "--prompt-len", type=lambda s: _range(s, "--prompt-len"), default=(8, 64), metavar="A:B",
        help="random prompt lengths, uniform in [A, B] (default 8:64)",
    )  # fmt: skip
    parser.add_argument(
        "--max-new-tokens", type=lambda s: _range(s, "--max-new-tokens"), default=(16, 16), metavar="N",
        help="tokens to generate per request: N, or A:B for a mix (default 16)",
    )  # fmt: skip
    parser.add_argument("--checkpoint", metavar="DIR", help="a Hugging Face Llama dir (config.json + safetensors)")
    parser.add_argument("--prompts", metavar="FILE", help="a JSON list of token-id lists (instead of random)")
    parser.add_argument("--colocated", action="store_true", help="prefill and decode interleaved in one process")
    arrivals = parser.add_mutually_exclusive_group()
    arrivals.add_argument("--arrival-interval", type=_interval, default=0.0, metavar="S", help="seconds apart")
    arrivals.add_argument("--rate", type=_rate, metavar="R", help="Poisson arrivals at R requests/s (gaps from --seed)")
    parser.add_argument("--transport", default=None, help="a registered transport (default: torch's)")
    parser.add_argument("--timeout", type=positive_seconds, default=30.0, metavar="S", help="per-transfer timeout (s)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64", "float16"))
    parser.add_argument("--seed", type=int, default=0, help="seeds the random model and prompts")
    parser.add_argument("--json", action="store_true", help='print {"requests": [...], "summary": {...}}')
    parser.add_argument("--port", type=int, help="serve the OpenAI HTTP API on this port")
    parser.add_argument("--host", default="127.0.0.1", help="the address the HTTP server binds (default 127.0.0.1)")
    parser.add_argument("--model-name", help="the model id the HTTP API reports (default: the checkpoint's folder)")
    parser.add_argument(
        "--prefix-cache-blocks", type=int, default=0, metavar="N", help="cache N prompt blocks (per prefill worker)"
    )
    parser.add_argument(
        "--prefill-chunk", type=positive_int, metavar="T",
        help="prefill T prompt tokens per step, each followed by a decode step (HTTP, or batch with --colocated)",
    )  # fmt: skip
    parser.add_argument(
        "--torchrun", action="store_true",
        help="run as one rank under torchrun (roles from RANK and WORLD_SIZE; rank 0 routes, and serves --port)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    if args.torchrun:
        from .torchrun import run_torchrun

        return run_torchrun(args)
    if args.port is not None:
        from .http import run_http

        return run_http(args)
    if args.prefill_chunk is not None and not args.colocated:
        raise ValueError("serve: --prefill-chunk in batch mode needs --colocated (a prefill worker prefills whole)")
    model, requests, described = batch(args)
    bar = _progress(len(requests))
    try:
        out = serve(
            requests,
            model,
            prefill_workers=args.prefill_workers or 1,
            decode_workers=args.decode_workers or 1,
            prefix_blocks=args.prefix_cache_blocks,
            colocated=args.colocated,
            prefill_chunk=args.prefill_chunk,
            transport=args.transport,
            timeout_s=args.timeout,
            on_progress=lambda n: bar.update(n - bar.n),
        )
    finally:
        bar.close()
    return report(args, out, described)


def batch(args: argparse.Namespace) -> tuple[Model, list[Request], str]:
    """The model, the requests and a description of the model that ``args`` name (batch mode)."""
    rng = np.random.default_rng(args.seed)
    if args.checkpoint:
        model = Model(args.backend, checkpoint=args.checkpoint, dtype=args.dtype)
        vocab = model.load_config().vocab_size
        described = f"checkpoint {args.checkpoint}"
    else:
        model = Model(args.backend, DEMO_MODEL, seed=args.seed, dtype=args.dtype)
        vocab = DEMO_MODEL["vocab_size"]
        described = "random model " + ", ".join(f"{k}={v}" for k, v in DEMO_MODEL.items())
    prompts: list[Any]
    if args.prompts:
        prompts = _read_prompts(args.prompts)  # each checked by the router: a bad one fails alone
    else:
        lo, hi = args.prompt_len
        prompts = [rng.integers(0, vocab, size=int(rng.integers(lo, hi + 1))) for _ in range(args.requests)]
    lo, hi = args.max_new_tokens
    if args.rate is not None:  # the load generator's gaps for the same seed and rate
        arrival = np.cumsum(poisson_gaps(np.random.default_rng(args.seed), len(prompts), args.rate)).tolist()
    else:
        arrival = [i * args.arrival_interval for i in range(len(prompts))]
    requests = [Request(i, p, int(rng.integers(lo, hi + 1)), arrival_s=arrival[i]) for i, p in enumerate(prompts)]
    return model, requests, described


def report(args: argparse.Namespace, out: dict[str, Any], described: str) -> int:
    """Print a batch run's records and summary (``--json``: as JSON)."""
    if args.json:
        print(json.dumps({"requests": out["requests"], "summary": out["summary"]}, indent=1))
        return 0
    s = out["summary"]
    print(f"tensorglot serve: {s['mode']}, backend {args.backend}, {described}")
    for event in out["events"]:
        print(f"  event: {event}")
    print(f"{'id':>4} {'prompt':>6} {'new':>4} {'ttft ms':>9} {'tpot ms':>9} {'kv KiB':>8}  tokens / error")
    for r in out["requests"]:
        n = len(r["prompt"]) if isinstance(r["prompt"], list) else "-"
        if r["error"]:
            print(f"{r['id']:>4} {n:>6} {'-':>4} {'-':>9} {'-':>9} {'-':>8}  {r['error']}")
            continue
        tpot = "-" if r["tpot_s"] is None else f"{1e3 * r['tpot_s']:.2f}"
        head = " ".join(map(str, r["tokens"][:8])) + (" ..." if len(r["tokens"]) > 8 else "")
        print(
            f"{r['id']:>4} {n:>6} {len(r['tokens']):>4} {1e3 * r['ttft_s']:>9.2f} {tpot:>9} "
            f"{r['kv_bytes'] / 1024:>8.1f}  {head}"
        )
    print(_summary_line(s))
    return 0


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"wanted a finite number of seconds >= 0, got {text!r}")
    return value


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"wanted a positive, finite number of requests/s, got {text!r}")
    return value


def _read_prompts(path: str) -> list[Any]:
    """The JSON list of prompts in ``path``, as given: the router checks each one on its own."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except OSError as exc:
        raise ValueError(f"serve: cannot read --prompts {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ValueError(f"serve: --prompts {path} is not JSON: {exc}") from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"serve: --prompts {path} must hold a non-empty JSON list of token-id lists, got {data!r:.60}")
    if all(isinstance(p, int | float) for p in data):
        raise ValueError(
            f"serve: --prompts {path} holds a flat list of numbers; wanted a list of token-id lists, "
            f"e.g. [{json.dumps(data[:4])[:60]}]"
        )
    return data


def _summary_line(s: dict[str, Any]) -> str:
    def ms(x: float | None) -> str:
        return "-" if x is None else f"{1e3 * x:.2f} ms"

    share = s["transfer_share_of_ttft_p50"]
    return (
        f"completed {s['completed']}/{s['requests']} (rejected {s['rejected']}, recomputed {s['recomputed']}); "
        f"TTFT p50 {ms(s['ttft_p50_s'])} p99 {ms(s['ttft_p99_s'])}; TPOT p50 {ms(s['tpot_p50_s'])} "
        f"p99 {ms(s['tpot_p99_s'])}; transfer share of TTFT p50 {'-' if share is None else f'{share:.1%}'}; "
        f"{s['tokens_per_s']:.1f} tokens/s"
    )


class _NoBar:
    n = 0

    def update(self, k: int) -> None:
        self.n += k

    def close(self) -> None:
        pass


def _progress(total: int) -> Any:
    if not sys.stderr.isatty():
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc="requests", unit="req", file=sys.stderr)
