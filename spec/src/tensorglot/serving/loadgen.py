"""A load generator for any OpenAI-compatible server: Poisson arrivals at a sweep of rates, and per rate
TTFT, TPOT and inter-token latency percentiles, throughput, SLO attainment and goodput.

``python -m tensorglot.serving.loadgen --url http://127.0.0.1:8000 --rates 1,2,4 --requests 32
--prompt-len 16:256 --max-tokens 32 --slo-ttft 0.5 --slo-tpot 0.05 [--json]``

Each request streams ``/v1/completions`` with a random token-id prompt (lengths uniform in
``--prompt-len``), greedy, ``ignore_eos`` so it generates exactly ``max_tokens``. Times are the client's:
TTFT = first chunk with a token − send; TPOT = (last − first) / (tokens − 1); ITL = the gaps between
chunks that carry tokens. Attainment and goodput are `tensorglot.serving.goodput`'s, shared with
``tensorglot bench serve``'s batch runs, which send the same requests (`workload`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import goodput


@dataclass
class Record:
    prompt_len: int
    sent: float = 0.0
    chunks: list[float] = field(default_factory=list)  # arrival time of each chunk that carried tokens
    tokens: int = 0
    ids: list[int] = field(default_factory=list)  # the token ids received, where the server reports them
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.chunks[0] - self.sent if self.chunks else None

    @property
    def tpot(self) -> float | None:
        return (self.chunks[-1] - self.chunks[0]) / (self.tokens - 1) if self.tokens > 1 else None

    def latency(self) -> goodput.Latency:
        return goodput.Latency(self.ttft, self.tpot, self.tokens, self.error, np.diff(self.chunks).tolist())


def workload(
    requests: int, rate: float, *, prompt_len: tuple[int, int], vocab: int, seed: int = 0
) -> tuple[np.ndarray, list[list[int]]]:
    """The gaps between arrivals (s) and the random token-id prompts (lengths uniform in ``prompt_len``)
    of one run: the same for the same arguments, whoever sends them."""
    rng = np.random.default_rng(seed)
    gaps = goodput.poisson_gaps(rng, requests, rate)
    prompts = [rng.integers(0, vocab, size=int(rng.integers(prompt_len[0], prompt_len[1] + 1))).tolist()
               for _ in range(requests)]  # fmt: skip
    return gaps, prompts


async def _one(client: Any, url: str, model: str | None, prompt: list[int], max_tokens: int, rec: Record) -> None:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    if model:
        body["model"] = model
    rec.sent = time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                rec.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    rec.error = chunk["error"]["message"]
                    return
                choices = chunk.get("choices", ())
                if all("token_ids" in c for c in choices):
                    n = sum(len(c["token_ids"]) for c in choices)
                    rec.ids += [t for c in choices for t in c["token_ids"]]
                else:  # a server that does not report token ids: a chunk with text is a token
                    n = sum(bool(c.get("text")) for c in choices)
                if n:
                    rec.chunks.append(time.perf_counter())
                    rec.tokens += n
    except Exception as exc:  # a failed request is a result, not the end of the run
        rec.error = f"{type(exc).__name__}: {exc}"


async def run_rate(
    url: str, rate: float, *, requests: int, prompt_len: tuple[int, int], max_tokens: int, vocab: int,
    model: str | None = None, seed: int = 0, timeout_s: float = 300.0,
) -> tuple[list[Record], float]:  # fmt: skip
    """Send ``requests`` with exponential gaps of mean 1/``rate`` s; the records and the wall time."""
    import httpx

    gaps, prompts = workload(requests, rate, prompt_len=prompt_len, vocab=vocab, seed=seed)
    records = [Record(len(p)) for p in prompts]
    limits = httpx.Limits(max_connections=requests)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        start, tasks = time.perf_counter(), []
        for gap, prompt, rec in zip(gaps, prompts, records):
            await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(_one(client, url.rstrip("/"), model, prompt, max_tokens, rec)))
        await asyncio.gather(*tasks)
    return records, time.perf_counter() - start


def summarize(records: list[Record], wall_s: float, *, slo_ttft: float, slo_tpot: float) -> dict[str, Any]:
    return goodput.summarize([r.latency() for r in records], wall_s, slo_ttft=slo_ttft, slo_tpot=slo_tpot)


def model_card(url: str) -> dict[str, Any]:
    """The server's first model in ``/v1/models`` (its ``id``, and ``vocab_size`` where it says)."""
    import httpx

    return dict(httpx.get(url.rstrip("/") + "/v1/models", timeout=30).json()["data"][0])


def sweep(url: str, rates: list[float], *, slo_ttft: float, slo_tpot: float, **kw: Any) -> list[dict[str, Any]]:
    """One `summarize` row per rate, each with its ``rate``."""
    rows = []
    for rate in rates:
        records, wall = asyncio.run(run_rate(url, rate, **kw))
        rows.append({"rate": rate} | summarize(records, wall, slo_ttft=slo_ttft, slo_tpot=slo_tpot))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tensorglot.serving.loadgen", description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", help="the model id to send (default: the server's first in /v1/models)")
    p.add_argument("--rates", default="1,2,4", help="requests per second, comma-separated")
    p.add_argument("--requests", type=int, default=32, help="requests per rate")
    p.add_argument("--prompt-len", default="16:256", metavar="A:B", help="prompt lengths, uniform in [A, B]")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--slo-ttft", type=float, default=0.5, metavar="S")
    p.add_argument("--slo-tpot", type=float, default=0.05, metavar="S")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    card = model_card(args.url)
    lo, _, hi = args.prompt_len.partition(":")
    rows = sweep(
        args.url, [float(r) for r in args.rates.split(",")], slo_ttft=args.slo_ttft, slo_tpot=args.slo_tpot,
        requests=args.requests, prompt_len=(int(lo), int(hi or lo)), max_tokens=args.max_tokens,
        vocab=int(card.get("vocab_size", 256)), model=args.model or card["id"], seed=args.seed,
    )  # fmt: skip
    print(json.dumps(rows, indent=1) if args.json else goodput.table(rows, args.slo_ttft, args.slo_tpot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
