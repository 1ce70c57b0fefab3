"""`tensorglot.serving.online.OnlineEngine` without HTTP: greedy equals `generate`, a seeded request's
tokens do not depend on the batch around it, and a job stops at a stop token, a refusal or max_tokens."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

import tensorglot
from tensorglot.serving import Model
from tensorglot.serving.online import Job, OnlineEngine
from tensorglot.serving.sampling import SamplingParams

CONFIG = tensorglot.TransformerConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
    activation="swiglu", rope_style="neox", max_seq_len=64,
)  # fmt: skip


def _backends() -> list[str]:
    # jax passes too but compiles once per prompt length (4 minutes here): opt in with the variable.
    wanted = os.environ.get("TENSORGLOT_SERVER_TEST_BACKENDS", "numpy,torch").split(",")
    return [b for b in wanted if b in tensorglot.available_backends()]


class _Collect:
    def __init__(self, stop_after: int | None = None) -> None:
        self.tokens: list[int] = []
        self.reason: str | None = None
        self.done = threading.Event()
        self.stop_after = stop_after

    def on_token(self, token: int) -> bool:
        self.tokens.append(token)
        return self.stop_after is None or len(self.tokens) < self.stop_after

    def on_finish(self, reason: str, error: str | None) -> None:
        self.reason = reason if error is None else f"{reason}: {error}"
        self.done.set()


def _run(engine: OnlineEngine, specs: list[tuple[np.ndarray, SamplingParams]], **kw) -> list[_Collect]:
    outs = [_Collect(**kw) for _ in specs]
    for (prompt, params), out in zip(specs, outs):
        engine.submit(Job(prompt, params, out.on_token, out.on_finish))
    for out in outs:
        assert out.done.wait(60), "the engine did not finish a job within 60 s"
    return outs


@pytest.fixture(params=_backends())
def engine(request):
    eng = OnlineEngine(Model(request.param, CONFIG.to_dict(), seed=3), max_batch=8, block_size=4).start()
    assert eng.ready.wait(60) and eng.load_error is None, eng.load_error
    yield eng
    eng.close()


def _prompts(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CONFIG.vocab_size, size=int(rng.integers(2, 20))) for _ in range(n)]


@pytest.mark.timeout(180)
def test_greedy_equals_generate(engine):
    be, params, config = engine.model.load()
    prompts = _prompts(6)
    outs = _run(engine, [(p, SamplingParams(max_tokens=9, temperature=0.0)) for p in prompts])
    for prompt, out in zip(prompts, outs):
        expected = be.to_numpy(be.layers.generate(params, config, prompt[None], max_new_tokens=9))[0, len(prompt) :]
        assert out.tokens == expected.tolist() and out.reason == "length"


@pytest.mark.timeout(180)
def test_seeded_sampling_repeats_and_ignores_the_batch(engine):
    prompt = _prompts(1, seed=5)[0]
    mine = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=11)
    alone = _run(engine, [(prompt, mine)])[0].tokens
    again = _run(engine, [(prompt, mine)])[0].tokens
    others = [(p, SamplingParams(max_tokens=int(3 + i), temperature=0.8, seed=i)) for i, p in enumerate(_prompts(6, 9))]
    crowded = _run(engine, [*others[:3], (prompt, mine), *others[3:]])[3].tokens
    other_seed = _run(engine, [(prompt, SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=12))])[0]
    assert alone == again == crowded
    assert other_seed.tokens != alone


@pytest.mark.timeout(180)
def test_stop_token_and_refusal_end_a_job_early(engine):
    prompt = _prompts(1, seed=2)[0]
    greedy = _run(engine, [(prompt, SamplingParams(max_tokens=10, temperature=0.0))])[0].tokens
    stop_at = greedy[4]
    first = greedy.index(stop_at)
    stopped = _run(engine, [(prompt, SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=(stop_at,)))])[0]
    assert stopped.tokens == greedy[:first] and stopped.reason == "stop"
    refused = _run(engine, [(prompt, SamplingParams(max_tokens=10, temperature=0.0))], stop_after=3)[0]
    assert refused.tokens == greedy[:3] and refused.reason == "stop"


@pytest.fixture(params=_backends())
def cached_engine(request):
    eng = OnlineEngine(
        Model(request.param, CONFIG.to_dict(), seed=3), max_batch=8, block_size=4, prefix_cache_blocks=64,
        chunk_tokens=5,
    ).start()  # fmt: skip
    assert eng.ready.wait(60) and eng.load_error is None, eng.load_error
    yield eng
    eng.close()


@pytest.mark.timeout(180)
def test_prefix_cache_and_chunked_prefill_keep_generates_tokens(cached_engine):
    be, params, config = cached_engine.model.load()
    rng = np.random.default_rng(1)
    shared = rng.integers(0, CONFIG.vocab_size, size=13)  # 3 full blocks of 4, and one token more
    prompts = [np.concatenate([shared, rng.integers(0, CONFIG.vocab_size, size=int(k))]) for k in (1, 6, 11, 3)]
    for prompt in prompts:  # one at a time, so each finds the blocks of those before it
        out = _run(cached_engine, [(prompt, SamplingParams(max_tokens=7, temperature=0.0))])[0]
        expected = be.to_numpy(be.layers.generate(params, config, prompt[None], max_new_tokens=7))[0, len(prompt) :]
        assert out.tokens == expected.tolist()
    stats, cache = cached_engine.stats, cached_engine.prefix
    assert stats["prompt_tokens"] == sum(len(p) for p in prompts)
    assert stats["prompt_tokens"] - stats["computed_prompt_tokens"] == 3 * 12 == cache.stats["matched_tokens"]
    crowd = _run(cached_engine, [(p, SamplingParams(max_tokens=5, temperature=0.0)) for p in prompts])
    for prompt, out in zip(prompts, crowd):  # chunks of one prompt interleaved with the others' decode steps
        expected = be.to_numpy(be.layers.generate(params, config, prompt[None], max_new_tokens=5))[0, len(prompt) :]
        assert out.tokens == expected.tolist()


@pytest.mark.timeout(120)
def test_close_drains_the_queued_and_running_jobs_then_refuses():
    eng = OnlineEngine(Model("numpy", CONFIG.to_dict(), seed=3), max_batch=2, block_size=4).start()
    assert eng.ready.wait(60) and eng.load_error is None
    outs = [_Collect() for _ in range(5)]
    for prompt, out in zip(_prompts(5, seed=4), outs):  # more jobs than rows: some wait in the queue
        eng.submit(Job(prompt, SamplingParams(max_tokens=6, temperature=0.0), out.on_token, out.on_finish))
    eng.close(timeout_s=60)
    assert not eng._thread.is_alive()
    assert [(len(o.tokens), o.reason) for o in outs] == [(6, "length")] * 5
    with pytest.raises(RuntimeError, match="shutting down"):
        eng.submit(Job(_prompts(1)[0], SamplingParams(), outs[0].on_token, outs[0].on_finish))
