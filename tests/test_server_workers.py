"""``tensorglot serve --port P --prefill-workers 1 --decode-workers 2``: the OpenAI HTTP server in front of
the router and worker processes (`tensorglot.serving.cluster.WorkerEngine`), started as a subprocess on a
free port over the seeded random `DEMO_MODEL` and driven with the official ``openai`` client. Tokens are
compared with ``layers.generate`` of the same model here."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

for _module, _why in [
    ("starlette", "the server is a Starlette app"),
    ("uvicorn", "the server runs on uvicorn"),
    ("openai", "the tests drive the server with the openai client"),
    ("httpx", "the health checks go through httpx"),
]:
    pytest.importorskip(_module, reason=_why)

import httpx  # noqa: E402
import openai  # noqa: E402
from server_health import wait_healthy  # noqa: E402

import tensorglot  # noqa: E402
from tensorglot.parallel.devices import free_port  # noqa: E402
from tensorglot.registry import registry  # noqa: E402
from tensorglot.serving import DEMO_MODEL  # noqa: E402

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not registry().transports(), reason="needs a serving transport (tensorglot-torch)"),
]
DEMO = tensorglot.TransformerConfig.from_dict(DEMO_MODEL)
RNG = np.random.default_rng(0)
PROMPTS = [RNG.integers(0, DEMO.vocab_size, size=int(n)).tolist() for n in (3, 9, 17, 30, 5, 12, 21, 8)]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = os.environ | {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    # with prefix blocks, a repeated prompt is computed and sent again only past its cached blocks
    cmd = [sys.executable, "-m", "tensorglot.cli", "serve", "--backend", "numpy", "--port", str(port), "--timeout",
           "20", "--prefill-workers", "1", "--decode-workers", "2", "--prefix-cache-blocks", "64"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def exited() -> str | None:
        return None if proc.poll() is None else f"the server exited with {proc.returncode}: {proc.stdout.read()}"

    try:
        wait_healthy(url, exited, within_s=120)
        yield url, openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(10)
    assert code == 0, "SIGTERM did not drain and exit cleanly"


def _greedy(prompt: list[int], n: int) -> list[int]:
    be = tensorglot.get_backend("numpy")
    out = be.layers.generate(tensorglot.init_params(DEMO, 0), DEMO, np.asarray([prompt]), max_new_tokens=n)
    return be.to_numpy(out)[0, len(prompt) :].tolist()


def _ids(choice) -> list[int]:
    return list(choice.model_extra["token_ids"])


@pytest.mark.timeout(300)
def test_greedy_equals_generate_and_streaming_equals_non_streaming(server):
    _, client = server
    prompt = PROMPTS[2]
    out = client.completions.create(model="demo", prompt=prompt, max_tokens=10, temperature=0)
    assert _ids(out.choices[0]) == _greedy(prompt, 10) and out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt), 10)
    chunks = list(client.completions.create(model="demo", prompt=prompt, max_tokens=10, temperature=0, stream=True))
    assert [t for c in chunks for t in _ids(c.choices[0])] == _ids(out.choices[0])
    assert len(chunks) >= 10  # a chunk per token: streamed as the decode worker produces them
    assert chunks[-1].choices[0].finish_reason == "length"
    # the second time, the prompt's full block (16 of 17 tokens) is neither computed nor sent again
    stats = httpx.get(server[0] + "/health").json()["stats"]
    assert stats["prefill_cached_tokens"] >= 16 and stats["decode_cached_tokens"] >= 16


@pytest.mark.timeout(300)
def test_eight_concurrent_requests_each_equal_generate(server):
    url, client = server

    def one(prompt: list[int]) -> list[int]:
        out = client.completions.create(model="demo", prompt=prompt, max_tokens=8, temperature=0)
        return _ids(out.choices[0])

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, PROMPTS))
    assert got == [_greedy(p, 8) for p in PROMPTS]
    stats = httpx.get(url + "/health").json()["stats"]
    assert stats["jobs"] >= 8 and stats["recomputed"] == 0


@pytest.mark.timeout(300)
def test_seeded_sampling_repeats_and_a_stop_token_ends_the_completion(server):
    _, client = server
    kw = {"model": "demo", "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0.9, "top_p": 0.95, "seed": 7}
    first, again = (_ids(client.completions.create(**kw).choices[0]) for _ in range(2))
    assert first == again and len(first) == 12
    greedy = _greedy(PROMPTS[1], 6)
    stop = greedy[3]
    cut = greedy[: greedy.index(stop)]
    out = client.completions.create(model="demo", prompt=PROMPTS[1], max_tokens=6, temperature=0,
                                    extra_body={"stop_token_ids": [stop]})  # fmt: skip
    assert _ids(out.choices[0]) == cut and out.choices[0].finish_reason == "stop"
