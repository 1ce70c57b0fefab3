"""``tensorglot serve --torchrun``: the serving ranks started by torchrun, on one machine or several.

torchrun (``python -m torch.distributed.run``) starts every process and sets ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``; each process runs this command with the same arguments, takes its
role from its rank — 0 the router (and, with ``--port``, the HTTP front end), 1..P prefill, P + 1..P + M
decode — and joins the transport through ``env://`` (the rendezvous torchrun did), where the launcher of
`tensorglot.serving.launch` would have spawned the ranks itself. ``WORLD_SIZE`` must be 1 + P + M.

    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --node-rank 0 \\
        -m tensorglot.cli serve --torchrun --prefill-workers 1 --decode-workers 2 --json   # and rank 1

A batch run (no ``--port``) prints on rank 0 what ``tensorglot serve`` prints; the workers exit when the
router stops them. With ``--port`` rank 0 serves until SIGINT or SIGTERM, then stops the workers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from . import router, workers
from . import transport as tr
from .metrics import summarize

ROLE_HELP = "rank 0 routes (and serves --port), ranks 1..P prefill, P + 1..P + M decode"


def roles(prefill: int, decode: int) -> list[str]:
    """The role of each rank of a world of 1 + ``prefill`` + ``decode``."""
    return ["router"] + ["prefill"] * prefill + ["decode"] * decode


def options(args: argparse.Namespace) -> workers.Options:
    return workers.Options(
        prefill_workers=args.prefill_workers or 1, decode_workers=args.decode_workers or 1,
        prefix_blocks=args.prefix_cache_blocks, timeout_s=args.timeout, transport=args.transport, address="env://",
    )  # fmt: skip


def run_torchrun(args: argparse.Namespace) -> int:
    """This process's rank of a torchrun world: route, prefill or decode (see the module)."""
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        raise ValueError("serve --torchrun: RANK and WORLD_SIZE are not set; start it with torchrun") from None
    opts = options(args)
    role = roles(opts.prefill_workers, opts.decode_workers)
    if world != len(role):
        raise ValueError(
            f"serve --torchrun: WORLD_SIZE is {world}, but --prefill-workers {opts.prefill_workers} and "
            f"--decode-workers {opts.decode_workers} need 1 + {opts.prefill_workers} + {opts.decode_workers} = "
            f"{len(role)} ranks ({ROLE_HELP})"
        )
    if rank == 0 and args.port is not None:
        from .http import run_http

        return run_http(args)  # its `WorkerEngine` joins env:// as rank 0 (see `options`)
    from .cli import batch, report

    model, requests, described = batch(args)
    t = tr.get_transport(opts.transport)(
        rank, world, address=opts.address, timeout_s=opts.timeout_s, payload_spec=tr.payload_spec
    )
    if role[rank] == "prefill":
        workers.prefill_worker(t, opts, model, None)
    elif role[rank] == "decode":
        workers.decode_worker(t, opts, model, None)
    else:
        out = Collect()
        router.router(t, opts, requests, model.load_config(), out)
        result = out.result
        mode = f"torchrun ({opts.prefill_workers} prefill + {opts.decode_workers} decode)"
        result["summary"] = summarize(result["requests"], mode=mode, wall_s=result.pop("wall_s"))
        for event in result["events"]:
            workers.logger.warning(event)
        report(args, result, described)
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(0.1)  # the transport's last sends (STOP, DONE) leave before the process does
    # Receive threads blocked on peers that already left keep a normal shutdown waiting; the work is done.
    os._exit(0)


class Collect:
    """The queue `router.router` reports on, in this process: keeps the result."""

    def __init__(self) -> None:
        self.result: dict[str, Any] = {}

    def put(self, item: tuple[str, Any]) -> None:
        if item[0] == "result":
            self.result = item[1]
