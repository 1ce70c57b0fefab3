"""``tensorglot serve --torchrun``: the same serving ranks started by torchrun across two local "nodes"
(two ``python -m torch.distributed.run --nnodes 2 --nproc-per-node 2`` invocations meeting at one c10d
rendezvous on a free port): rank 0 routes, one rank prefills, two decode, and every request's tokens
equal ``layers.generate``'s; with ``--port`` rank 0 serves the OpenAI API in front of them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from server_health import wait_healthy

import tensorglot
from tensorglot.parallel.devices import free_port
from tensorglot.serving import DEMO_MODEL

torch = pytest.importorskip("torch", reason="torchrun is torch's launcher")
pytestmark = pytest.mark.distributed
DEMO = tensorglot.TransformerConfig.from_dict(DEMO_MODEL)
RNG = np.random.default_rng(5)
SHARED = RNG.integers(0, DEMO.vocab_size, size=32).tolist()
PROMPTS = [SHARED + RNG.integers(0, DEMO.vocab_size, size=int(n)).tolist() for n in (3, 9, 1, 14)]
PROMPTS += [RNG.integers(0, DEMO.vocab_size, size=int(n)).tolist() for n in (5, 20)]


def _greedy(prompt: list[int], n: int) -> list[int]:
    be = tensorglot.get_backend("numpy")
    out = be.layers.generate(tensorglot.init_params(DEMO, 0), DEMO, np.asarray([prompt]), max_new_tokens=n)
    return be.to_numpy(out)[0, len(prompt) :].tolist()


def _two_nodes(args: list[str]) -> list[subprocess.Popen]:
    env = os.environ | {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    endpoint = f"127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--max-restarts", "0"]  # fmt: skip
    serve = ["-m", "tensorglot.cli", "serve", "--torchrun", "--backend", "numpy", "--prefill-workers", "1",
             "--decode-workers", "2", "--timeout", "20", *args]  # fmt: skip
    out = subprocess.PIPE
    nodes = [[*cmd, "--node-rank", str(node), *serve] for node in (0, 1)]
    return [subprocess.Popen(argv, env=env, stdout=out, stderr=out, text=True) for argv in nodes]


def _end(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, stderr = p.communicate()
        out.append((p.returncode, stdout, stderr))
    return out


@pytest.mark.timeout(120)
def test_two_torchrun_nodes_serve_a_batch_with_tokens_equal_to_generate(tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    procs = _two_nodes(["--prompts", str(prompts), "--max-new-tokens", "6", "--prefix-cache-blocks", "64", "--json"])
    ended = _end(procs, timeout=90)
    assert [code for code, _, _ in ended] == [0, 0], [err[-2000:] for _, _, err in ended]
    # rank 0 is on whichever node the c10d rendezvous ordered first: exactly one prints the records
    printed = [json.loads(out) for _, out, _ in ended if out.strip()]
    assert len(printed) == 1
    recs = printed[0]["requests"]
    assert [rec["tokens"] for rec in recs] == [_greedy(p, 6) for p in PROMPTS]
    assert all(rec["kv_digest_ok"] and rec["worker"] == 1 and rec["decode_worker"] in (2, 3) for rec in recs)
    assert printed[0]["summary"]["mode"] == "torchrun (1 prefill + 2 decode)"


def test_a_world_of_the_wrong_size_is_refused_with_the_roles(monkeypatch):
    from tensorglot.serving.cli import configure
    from tensorglot.serving.torchrun import run_torchrun

    parser = __import__("argparse").ArgumentParser()
    configure(parser)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    args = parser.parse_args(["--torchrun", "--prefill-workers", "1", "--decode-workers", "2"])
    with pytest.raises(ValueError, match=r"WORLD_SIZE is 3, but .* need 1 \+ 1 \+ 2 = 4 ranks"):
        run_torchrun(args)


@pytest.mark.timeout(150)
def test_rank_0_serves_the_openai_api_in_front_of_torchrun_workers():
    openai = pytest.importorskip("openai", reason="the test drives the server with the openai client")
    pytest.importorskip("httpx", reason="the health checks go through httpx")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    procs = _two_nodes(["--port", str(port)])

    def exited() -> str | None:
        return None if all(p.poll() is None for p in procs) else f"a torchrun node exited: {_end(procs, 5)}"

    try:
        wait_healthy(url, exited, within_s=90)  # ~12 s on an idle 2-core box
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        out = client.completions.create(model="demo", prompt=PROMPTS[1], max_tokens=8, temperature=0)
        assert list(out.choices[0].model_extra["token_ids"]) == _greedy(PROMPTS[1], 8)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        _end(procs, timeout=30)
