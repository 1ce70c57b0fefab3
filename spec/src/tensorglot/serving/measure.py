"""What prefix caching and chunked prefill buy the server's engine, measured on one workload each
(``python -m tensorglot.serving.measure [--backend numpy] [--json]``; the numbers in docs/serving.md).

* `prefix_cache_effect`: requests sharing a long prefix, one after another, through an `OnlineEngine`
  with and without a prefix cache: prompt tokens computed, median TTFT (submission to first token), and
  whether both gave the same tokens.
* `chunked_prefill_effect`: short requests decoding while long prompts arrive, with and without chunked
  prefill: the decoding requests' inter-token latency (p50, max) and median TTFT of the long prompts.

Times are medians or maxima of one run on whatever the machine is doing: read ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from typing import Any

import numpy as np

from .model import DEMO_MODEL, Model
from .online import Job, OnlineEngine
from .sampling import SamplingParams


class _Trace:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.times: list[float] = []
        self.done = threading.Event()

    def on_token(self, token: int) -> bool:
        self.tokens.append(token)
        self.times.append(time.perf_counter())
        return True

    def on_finish(self, reason: str, error: str | None) -> None:
        self.done.set()


def _submit(engine: OnlineEngine, prompt: np.ndarray, max_tokens: int) -> tuple[Job, _Trace]:
    trace = _Trace()
    job = Job(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0), trace.on_token, trace.on_finish)
    engine.submit(job)
    return job, trace


def _ttft(job: Job) -> float:
    return float("nan") if job.first_token_s is None else job.first_token_s  # nan: it never got a token


def _engine(backend: str, **kw: Any) -> OnlineEngine:
    engine = OnlineEngine(Model(backend, DEMO_MODEL, seed=0), max_batch=16, block_size=16, **kw).start()
    if not engine.ready.wait(300) or engine.load_error:
        raise RuntimeError(f"measure: the engine did not load: {engine.load_error}")
    return engine


def prefix_cache_effect(
    backend: str = "numpy", *, requests: int = 8, shared: int = 384, unique: int = 16, new: int = 4
) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    head = rng.integers(0, DEMO_MODEL["vocab_size"], size=shared)
    prompts = [np.concatenate([head, rng.integers(0, DEMO_MODEL["vocab_size"], size=unique)]) for _ in range(requests)]
    out: dict[str, Any] = {}
    for label, blocks in (("off", 0), ("on", 4096)):
        engine = _engine(backend, prefix_cache_blocks=blocks)
        ttft, tokens = list[float](), []
        try:
            for prompt in prompts:
                job, trace = _submit(engine, prompt, new)
                trace.done.wait(300)
                ttft.append(_ttft(job))
                tokens.append(trace.tokens)
        finally:
            engine.close()
        out[label] = {"ttft_p50_s": float(np.median(ttft[1:])), "computed": engine.stats["computed_prompt_tokens"]}
        out[label]["tokens"] = tokens
    same = out["on"].pop("tokens") == out["off"].pop("tokens")
    saved = 1 - out["on"]["computed"] / out["off"]["computed"]
    ratio = out["on"]["ttft_p50_s"] / out["off"]["ttft_p50_s"]
    return {"workload": f"{requests} x ({shared} shared + {unique} own) tokens, {new} new, one at a time",
            "prompt_tokens": sum(map(len, prompts)), **out, "prefill_tokens_saved": saved,
            "ttft_p50_on_over_off": ratio, "same_tokens": same}  # fmt: skip


def chunked_prefill_effect(
    backend: str = "numpy", *, chats: int = 4, chat_new: int = 48, longs: int = 3, long_len: int = 448, chunk: int = 64
) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    V = DEMO_MODEL["vocab_size"]
    chat_prompts = [rng.integers(0, V, size=16) for _ in range(chats)]
    long_prompts = [rng.integers(0, V, size=long_len) for _ in range(longs)]
    out: dict[str, Any] = {}
    for label, chunk_tokens in (("whole", None), ("chunked", chunk)):
        engine = _engine(backend, chunk_tokens=chunk_tokens)
        try:
            running = [_submit(engine, p, chat_new) for p in chat_prompts]
            time.sleep(0.2)  # the chats are decoding when the long prompts arrive
            arriving = []
            for p in long_prompts:
                arriving.append(_submit(engine, p, 2))
                time.sleep(0.05)
            for _, trace in running + arriving:
                trace.done.wait(600)
        finally:
            engine.close()
        gaps = np.concatenate([np.diff(t.times) for _, t in running])
        out[label] = {
            "chat_itl_p50_s": float(np.median(gaps)),
            "chat_itl_max_s": float(gaps.max()),
            "long_ttft_p50_s": float(np.median([_ttft(job) for job, _ in arriving])),
            "tokens": [t.tokens for _, t in running + arriving],
        }
    same = out["whole"].pop("tokens") == out["chunked"].pop("tokens")
    ratio = out["chunked"]["chat_itl_max_s"] / out["whole"]["chat_itl_max_s"]
    workload = f"{chats} chats of 16 tokens x {chat_new} new while {longs} prompts of {long_len} arrive"
    return {"workload": f"{workload}; chunks of {chunk}", **out, "same_tokens": same,
            "chat_itl_max_chunked_over_whole": ratio}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tensorglot.serving.measure", description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = {"prefix_cache": prefix_cache_effect(args.backend)}
    result["chunked_prefill"] = chunked_prefill_effect(args.backend)
    print(json.dumps(result, indent=1) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
