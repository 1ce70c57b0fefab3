"""``tensorglot serve --port``: the OpenAI HTTP server, started as a subprocess on a free port over a tiny
offline checkpoint and driven with the official ``openai`` client (and raw ``httpx`` for bodies the
client will not send). Tokens are compared with ``layers.generate`` of the same checkpoint here."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

for _module, _why in [
    ("torch", "the checkpoint is built with transformers on torch"),
    ("transformers", "the checkpoint is a transformers LlamaForCausalLM"),
    ("tokenizers", "the server's text goes through tokenizers"),
    ("starlette", "the server is a Starlette app"),
    ("uvicorn", "the server runs on uvicorn"),
    ("openai", "the tests drive the server with the openai client"),
    ("httpx", "raw requests go through httpx"),
]:
    pytest.importorskip(_module, reason=_why)

import httpx  # noqa: E402
import openai  # noqa: E402
from server_checkpoint import make_checkpoint  # noqa: E402

import tensorglot  # noqa: E402
from tensorglot import checkpoints  # noqa: E402
from tensorglot.serving import DEMO_MODEL  # noqa: E402
from tensorglot.serving.text import Text  # noqa: E402

pytestmark = pytest.mark.distributed
CONTEXT = 96
NAME = "tiny-llama"
DEMO = tensorglot.TransformerConfig.from_dict(DEMO_MODEL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, directory, *extra: str) -> None:  # directory None: the random DEMO_MODEL
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = os.environ | {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        where = [] if directory is None else ["--checkpoint", str(directory)]
        cmd = [sys.executable, "-m", "tensorglot.cli", "serve", *where, "--backend", "numpy",
               "--port", str(self.port), "--model-name", NAME, *extra]  # fmt: skip
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            self.stop()
            raise RuntimeError("the server did not become healthy within 90 s")
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), max_positions=CONTEXT)


@pytest.fixture(scope="module")
def server(checkpoint):
    """With prefix caching and chunked prefill; the SIGTERM test's server runs without either."""
    srv = Server(checkpoint, "--prefix-cache-blocks", "64", "--prefill-chunk", "8")
    yield srv
    assert srv.stop() == 0, "SIGTERM did not drain and exit cleanly"


@pytest.fixture(scope="module")
def oracle(checkpoint):
    """``greedy(prompt_ids, n)``: `layers.generate`'s n new tokens on the NumPy reference."""
    be = tensorglot.get_backend("numpy")
    params, config = checkpoints.load_llama(checkpoint)

    def greedy(prompt: list[int], n: int) -> list[int]:
        out = be.layers.generate(params, config, np.asarray([prompt]), max_new_tokens=n)
        return be.to_numpy(out)[0, len(prompt) :].tolist()

    return greedy


@pytest.fixture(scope="module")
def text(checkpoint):
    return Text.load(checkpoint)


def _ids(choice) -> list[int]:
    return list(choice.model_extra["token_ids"])


def _complete(server: Server, **kw):
    extra = {k: kw.pop(k) for k in ("top_k", "min_p", "ignore_eos", "stop_token_ids") if k in kw}
    return server.client.completions.create(model=NAME, extra_body=extra or None, **kw)


@pytest.mark.timeout(300)
def test_health_and_models(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    models = server.client.models.list()
    assert [m.id for m in models.data] == [NAME]


@pytest.mark.timeout(300)
def test_greedy_text_and_token_prompts_equal_generate(server, oracle, text):
    prompt = "hello world, the quick brown fox"
    ids = text.encode(prompt)
    by_text = _complete(server, prompt=prompt, max_tokens=12, temperature=0, ignore_eos=True)
    by_ids = _complete(server, prompt=ids, max_tokens=12, temperature=0, ignore_eos=True)
    expected = oracle(ids, 12)
    for out in (by_text, by_ids):
        choice = out.choices[0]
        assert _ids(choice) == expected and choice.finish_reason == "length"
        assert choice.text == text.decode(expected)
        assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), 12)


@pytest.mark.timeout(300)
def test_streaming_equals_non_streaming(server):
    kw = dict(prompt="a naïve café", max_tokens=16, temperature=1.0, top_p=0.9, seed=4, ignore_eos=True)
    whole = _complete(server, **kw).choices[0]
    chunks = list(_complete(server, stream=True, stream_options={"include_usage": True}, **kw))
    pieces = [c.choices[0] for c in chunks if c.choices]
    assert "".join(p.text for p in pieces) == whole.text
    assert [t for p in pieces for t in p.model_extra["token_ids"]] == _ids(whole)
    assert pieces[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 16


@pytest.mark.timeout(300)
def test_seeded_sampling_repeats_and_ignores_the_batch(server):
    kw = dict(prompt="tensorglot serves", max_tokens=10, temperature=1.0, top_k=50, min_p=0.01, seed=77)
    alone = _ids(_complete(server, ignore_eos=True, **kw).choices[0])
    assert _ids(_complete(server, ignore_eos=True, **kw).choices[0]) == alone
    others = [dict(kw, seed=s, max_tokens=4 + s % 7) for s in range(15)]
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(_complete, server, ignore_eos=True, **k) for k in [*others[:7], kw, *others[7:]]]
        crowded = [_ids(f.result().choices[0]) for f in futures]
    assert crowded[7] == alone
    assert alone not in crowded[:7] + crowded[8:]  # other seeds draw other tokens


@pytest.mark.timeout(300)
def test_sixteen_concurrent_requests_each_equal_generate(server, oracle, text):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, text.vocab_size, size=int(rng.integers(1, 30))).tolist() for _ in range(16)]
    lengths = [int(rng.integers(1, 20)) for _ in range(16)]
    with ThreadPoolExecutor(16) as pool:
        futures = [
            pool.submit(_complete, server, prompt=p, max_tokens=n, temperature=0, ignore_eos=True)
            for p, n in zip(prompts, lengths)
        ]
        outs = [_ids(f.result().choices[0]) for f in futures]
    assert outs == [oracle(p, n) for p, n in zip(prompts, lengths)]


@pytest.mark.timeout(300)
def test_bad_requests_get_400_with_an_openai_error_while_others_complete(server, oracle, text):
    ids = text.encode("hello server")
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(_complete, server, prompt=ids, max_tokens=40, temperature=0, ignore_eos=True)
        bad = {
            "prompt": {"model": NAME, "prompt": [1, 2, text.vocab_size + 5]},
            "max_tokens": {"model": NAME, "prompt": "hi", "max_tokens": 0},
        }
        long = {"model": NAME, "prompt": list(range(2, 2 + CONTEXT)), "max_tokens": 1}
        for param, body in [*bad.items(), ("prompt", long)]:
            r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
            err = r.json()["error"]
            assert r.status_code == 400 and err["type"] == "invalid_request_error" and err["param"] == param, r.text
            assert set(err) == {"message", "type", "param", "code"}
        r = httpx.post(server.url + "/v1/completions", content=b'{"prompt": [1, 2', timeout=30)
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        with pytest.raises(openai.BadRequestError) as info:
            _complete(server, prompt="hi", max_tokens=-3)
        assert info.value.status_code == 400 and info.value.body["param"] == "max_tokens"
        assert _ids(running.result().choices[0]) == oracle(ids, 40)


@pytest.mark.timeout(300)
def test_chat_uses_the_template_and_streams_the_same(server, oracle, text):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    ids = text.encode(text.render_chat(messages), special=False)
    extra = {"ignore_eos": True}
    out = server.client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=9, temperature=0, extra_body=extra
    )
    assert _ids(out.choices[0]) == oracle(ids, 9)
    assert out.choices[0].message.content == text.decode(oracle(ids, 9))
    stream = server.client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=9, temperature=0, stream=True, extra_body=extra
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == out.choices[0].message.content


@pytest.mark.timeout(300)
def test_stop_strings_n_and_echo(server, oracle, text):
    ids = text.encode("hello world")
    full = text.decode(oracle(ids, 20))
    stop = full[5:8]
    cut = full[: full.find(stop)]
    out = _complete(server, prompt="hello world", max_tokens=20, temperature=0, stop=[stop], ignore_eos=True)
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    streamed = _complete(server, prompt="hello world", max_tokens=20, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut
    two = _complete(server, prompt="hello world", max_tokens=8, n=2, seed=3, ignore_eos=True)
    assert [c.index for c in two.choices] == [0, 1] and _ids(two.choices[0]) != _ids(two.choices[1])
    echoed = _complete(server, prompt="hello world", max_tokens=4, temperature=0, echo=True, ignore_eos=True)
    assert echoed.choices[0].text == "hello world" + text.decode(oracle(ids, 4))


@pytest.mark.timeout(300)
def test_sigterm_drains_the_request_in_flight(checkpoint, oracle, text):
    srv = Server(checkpoint)
    try:
        ids = text.encode("hello client")
        body = {"model": NAME, "prompt": ids, "max_tokens": 60, "temperature": 0, "stream": True, "ignore_eos": True}
        got, done = [], threading.Event()
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done.set()
                elif line.startswith("data: "):
                    got += json.loads(line[6:])["choices"][0]["token_ids"]
                    if len(got) == 1:
                        srv.proc.send_signal(signal.SIGTERM)
        assert done.is_set() and got == oracle(ids, 60)
        assert srv.proc.wait(60) == 0
    finally:
        srv.stop()


@pytest.mark.timeout(300)
def test_a_shared_prefix_is_computed_once(server, oracle, text):
    shared = text.encode(" ".join(["tensorglot serves tokens over http with sampling and streaming"] * 2))
    assert len(shared) >= 32  # at least two full blocks of the server's 16
    before = httpx.get(server.url + "/health").json()["stats"]
    for tail in ([5, 6], [7, 8, 9], [10]):
        out = _complete(server, prompt=shared + tail, max_tokens=6, temperature=0, ignore_eos=True)
        assert _ids(out.choices[0]) == oracle(shared + tail, 6)
    after = httpx.get(server.url + "/health").json()["stats"]
    saved = (after["prompt_tokens"] - after["computed_prompt_tokens"]) - (
        before["prompt_tokens"] - before["computed_prompt_tokens"]
    )
    assert saved >= 2 * (len(shared) // 16) * 16  # the 2nd and 3rd reuse the 1st's full blocks


@pytest.mark.timeout(300)
def test_the_load_generator_measures_every_request(server):
    from tensorglot.serving import loadgen

    records, wall = asyncio.run(
        loadgen.run_rate(server.url, 20.0, requests=8, prompt_len=(4, 24), max_tokens=5, vocab=50, model=NAME)
    )
    assert [r.error for r in records] == [None] * 8 and [r.tokens for r in records] == [5] * 8
    assert all(r.ttft > 0 and r.tpot > 0 for r in records)
    loose = loadgen.summarize(records, wall, slo_ttft=1e9, slo_tpot=1e9)
    assert loose["slo_attainment"] == 1.0 and loose["goodput_rps"] == pytest.approx(8 / wall)
    assert loadgen.summarize(records, wall, slo_ttft=0.0, slo_tpot=1e9)["goodput_rps"] == 0.0


@pytest.mark.timeout(300)
def test_the_demo_model_takes_token_ids_and_a_leaving_client_cancels():
    srv = Server(None)
    try:
        be = tensorglot.get_backend("numpy")
        params = tensorglot.init_params(DEMO, 0)
        prompt = [3, 1, 4, 1, 5]
        out = _complete(srv, prompt=prompt, max_tokens=4, temperature=0)
        expected = be.layers.generate(params, DEMO, np.asarray([prompt]), max_new_tokens=4)[0, 5:].tolist()
        assert _ids(out.choices[0]) == expected and out.choices[0].text == ""
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "words", "max_tokens": 2}, timeout=30)
        assert r.status_code == 400 and "tokenizer.json" in r.json()["error"]["message"]
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        # A client that leaves a stream cancels its job (400 tokens of this model take seconds).
        body = {"model": NAME, "prompt": [5, 6, 7], "max_tokens": 400, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i == 4:
                    break  # the connection closes mid-stream
        deadline = time.monotonic() + 30
        while httpx.get(srv.url + "/health").json()["stats"]["cancelled"] == 0:  # only a live job is cancelled
            assert time.monotonic() < deadline, "the engine never dropped the abandoned job"
            time.sleep(0.05)
    finally:
        assert srv.stop() == 0
