"""``tensorglot parallel --model transformer``: run the transformer's step under each strategy on a
backend and print what it measured against `transformer_cost` (bytes per device by collective, memory
per rank, activation memory per rank, pipeline slots and bubble), with max |error| against the
backend's one-device `value_and_grad`. ``--schedule`` (gpipe, 1f1b, interleaved with ``--chunks``,
zb_h1) and ``--microbatches`` shape the pipelines."""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

import numpy as np

from ..params import TransformerConfig, init_params
from .devices import request_host_devices
from .transformer import TRANSFORMER_STRATEGIES
from .transformer_checks import PIPELINES
from .transformer_cost import transformer_cost

SEQ, HEADS, KV_HEADS, VOCAB = 16, 4, 2, 64


def collect(args: argparse.Namespace) -> list[dict[str, Any]]:
    import tensorglot

    from ..registry import resolve_name

    if args.strategy != "all" and args.strategy not in TRANSFORMER_STRATEGIES:
        raise ValueError(
            f"parallel: unknown transformer strategy {args.strategy!r}, wanted one of "
            f"{', '.join(TRANSFORMER_STRATEGIES)} or all"
        )
    if args.dtype != "float32":
        raise ValueError(f"parallel: --model transformer runs in float32 (or float64 in the tests), got {args.dtype}")
    name = resolve_name(args.backend)
    request_host_devices(name, args.world_size)
    backend = tensorglot.get_backend(name)
    if not hasattr(backend.parallel, "transformer_step"):
        raise ValueError(f"parallel: backend {backend.name!r} has no transformer_step")
    runs = getattr(backend.parallel, "TRANSFORMER_STRATEGIES", TRANSFORMER_STRATEGIES)  # a backend may run fewer
    config = TransformerConfig(
        vocab_size=VOCAB,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=HEADS,
        n_kv_heads=KV_HEADS,
        head_dim=args.d_model // HEADS,
        d_ff=args.d_ff,
        max_seq_len=SEQ,
    )
    wanted = tuple(runs) if args.strategy == "all" else (args.strategy,)
    options: dict[str, dict[str, Any]] = {s: {} for s in wanted}
    for s in set(wanted) & set(PIPELINES):  # tp_pp and dp_tp_pp keep their default m (the pp size)
        options[s] = {"microbatches": args.microbatches if s in ("pp", "dp_pp") else None}
        options[s] |= {"schedule": args.schedule, "chunks": args.chunks}
    if "dp_tp" in options:
        options["dp_tp"]["tp_size"] = args.tp_size
    models = {s: transformer_cost(s, config, args.batch, SEQ, args.world_size, **options[s]) for s in wanted}
    params = init_params(config, seed=0, dtype="float32")
    rng = np.random.default_rng(0)
    tokens, targets = (rng.integers(0, VOCAB, (args.batch, SEQ)) for _ in range(2))
    loss, grads = backend.layers.value_and_grad(tokens, targets, params, config)
    one = {k: backend.to_numpy(v) for k, v in grads.items()}
    rows = []
    for s in wanted:
        kw = dict(strategy=s, world_size=args.world_size, timeout=args.timeout, **options[s])
        backend.parallel.transformer_step(params, config, tokens, targets, **kw)  # warm-up: starts the ranks
        runs = [backend.parallel.transformer_step(params, config, tokens, targets, **kw) for _ in range(args.repeats)]
        got, model = runs[-1], models[s]
        err = max(float(np.max(np.abs(got.grads[k] - one[k]))) for k in one)
        rows.append(
            {
                "backend": backend.name,
                "model": "transformer",
                "strategy": s,
                "world_size": args.world_size,
                "max_abs_error": max(err, abs(got.loss - float(loss))),
                "bytes_per_device_measured": got.bytes_per_device,
                "bytes_per_device_model": model.bytes_per_device,
                "bytes_by_kind_measured": got.bytes_by_kind,
                "bytes_by_kind_model": model.bytes_by_kind,
                "param_bytes_per_rank": [got.param_bytes_per_rank, model.param_bytes_per_rank],
                "grad_bytes_per_rank": [got.grad_bytes_per_rank, model.grad_bytes_per_rank],
                "activation_bytes_per_rank": [got.activation_bytes_per_rank, model.activation_bytes_per_rank],
                "schedule": options[s].get("schedule"),
                "slots": [1 + max(row[0] for row in got.schedule), model.slots] if got.schedule else None,
                "bubble": model.bubble,
                "seconds_per_step": statistics.median(r.seconds for r in runs),
            }
        )
    return rows


def run(args: argparse.Namespace) -> int:
    rows = collect(args)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"tensorglot parallel --model transformer: backend {rows[0]['backend']}, {args.world_size} devices, "
        f"L={args.layers} B={args.batch} S={SEQ} D={args.d_model} N={HEADS} K={KV_HEADS} F={args.d_ff} V={VOCAB} "
        f"float32; pp: {args.microbatches} microbatches, {args.schedule}"
        + (f", {args.chunks} chunks" if args.chunks else "")
    )
    header: tuple[str, ...] = (
        "strategy",
        "max|err|",
        "bytes/dev measured",
        "model",
        "by kind",
        "param B/rank",
        "grad B/rank",
    )
    header += ("act B/rank", "bubble", "s/step")
    table = [header] + [
        (
            r["strategy"],
            f"{r['max_abs_error']:.2g}",
            str(r["bytes_per_device_measured"]),
            str(r["bytes_per_device_model"]),
            " ".join(f"{k}={v}" for k, v in r["bytes_by_kind_measured"].items()),
            str(r["param_bytes_per_rank"][0]),
            str(r["grad_bytes_per_rank"][0]),
            str(r["activation_bytes_per_rank"][0]),
            f"{r['bubble']:.3g}" if r["slots"] else "",
            f"{r['seconds_per_step']:.3g}",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    bad = [
        r["strategy"]
        for r in rows
        if r["bytes_by_kind_measured"] != r["bytes_by_kind_model"]
        or r["param_bytes_per_rank"][0] != r["param_bytes_per_rank"][1]
        or r["grad_bytes_per_rank"][0] != r["grad_bytes_per_rank"][1]
        or r["activation_bytes_per_rank"][0] != r["activation_bytes_per_rank"][1]
        or (r["slots"] and r["slots"][0] != r["slots"][1])
    ]
    if bad:
        print(f"measured differs from the model for: {', '.join(bad)}")
    return 0
