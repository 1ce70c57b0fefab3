"""Disaggregated serving: tokens equal `generate`, KV arrives bit for bit, faults are recomputed.

The model runs on the NumPy backend (and on torch once its layers are installed); the transport is
torch.distributed (gloo) either way. Models and workloads are tiny: the point is the bookkeeping.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

import tensorglot

pytest.importorskip("torch", reason="serving's transport is torch.distributed")

from tensorglot_torch.serving import DecodeEngine, Fault, Model, Request, prefill, serve
from tensorglot_torch.serving.engine import Sequence
from tensorglot_torch.serving.protocol import digest

CONFIG = tensorglot.TransformerConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=48
)


def _backends():
    names = ["numpy"]
    if "torch" in tensorglot.available_backends():
        names.append("torch")
    return names


def _reference(backend: str, prompt: np.ndarray, n: int) -> list[int]:
    be = tensorglot.get_backend(backend)
    params = {k: be.asarray(v) for k, v in tensorglot.init_params(CONFIG, 0).items()}
    out = be.to_numpy(be.layers.generate(params, CONFIG, be.asarray(prompt[None], dtype="int64"), max_new_tokens=n))
    return out[0, len(prompt) :].tolist()


def _workload(n: int, seed: int = 0) -> list[Request]:
    rng = np.random.default_rng(seed)
    reqs = []
    for i in range(n):
        P, new = int(rng.integers(1, 24)), int(rng.integers(1, 12))
        reqs.append(Request(i, rng.integers(0, CONFIG.vocab_size, size=P), new, arrival_s=0.003 * i))
    return reqs


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", _backends())
def test_continuous_batching_on_the_paged_pool_equals_generate(backend):
    """Requests of different lengths join and leave the decode batch between steps."""
    be = tensorglot.get_backend(backend)
    params = {k: be.asarray(v) for k, v in tensorglot.init_params(CONFIG, 0).items()}
    engine = DecodeEngine(be, params, CONFIG, max_batch=4, block_size=4)
    reqs = _workload(7, seed=1)
    pending, done = list(reqs), {}
    while pending or engine.active:
        if pending and engine.can_admit(len(pending[0].prompt), pending[0].max_new_tokens):
            req = pending.pop(0)  # one joins per step: the batch holds sequences of different lengths
            pre = prefill(be, params, CONFIG, req.prompt)
            for seq in engine.admit(Sequence(req.rid, req.max_new_tokens, [pre.first_token], 0.0), pre.k, pre.v):
                done[seq.rid] = seq.tokens
        if engine.active:
            assert len(engine.active) <= 4
            for seq in engine.step():
                done[seq.rid] = seq.tokens
    for req in reqs:
        assert done[req.rid] == _reference(backend, req.prompt, req.max_new_tokens), req.rid
    assert engine.pool.free_blocks() == engine.pool.num_blocks  # every block came back
    assert not engine.pool.tables


@pytest.mark.timeout(60)
def test_pool_stores_what_prefill_computed():
    be = tensorglot.get_backend("numpy")
    params = tensorglot.init_params(CONFIG, 0)
    engine = DecodeEngine(be, params, CONFIG, max_batch=2, block_size=4)
    pre = prefill(be, params, CONFIG, np.arange(10))
    engine.pool.insert(7, pre.k, pre.v)
    k, v = engine.pool.read(7)
    assert all(np.array_equal(a, b) for a, b in zip(k + v, pre.k + pre.v))
    assert engine.pool.tables[7] == [0, 1, 2]  # ceil(10 / 4) blocks, lowest first


@pytest.mark.timeout(60)
def test_colocated_tokens_equal_generate_and_long_requests_are_rejected():
    reqs = [*_workload(4), Request(4, np.arange(40), 9)]  # 40 + 9 > max_seq_len = 48
    out = serve(reqs, Model("numpy", CONFIG.to_dict(), seed=0), colocated=True)
    for req, rec in zip(reqs[:4], out["requests"]):
        assert rec["tokens"] == _reference("numpy", req.prompt, req.max_new_tokens)
    assert out["requests"][4]["tokens"] == []
    assert "longer than the model's context (max_seq_len = 48)" in out["requests"][4]["error"]
    assert out["summary"]["completed"] == 4 and out["summary"]["rejected"] == 1


@pytest.mark.timeout(240)
@pytest.mark.parametrize("backend", _backends())
def test_disaggregated_tokens_equal_generate_and_kv_arrives_bit_for_bit(backend):
    reqs = [*_workload(6), Request(6, np.arange(45) % 64, 10)]  # the last one is too long
    reqs[2].max_new_tokens = 1  # done by prefill alone
    out = serve(reqs, Model(backend, CONFIG.to_dict(), seed=0), prefill_workers=2, timeout_s=60)
    be = tensorglot.get_backend(backend)
    params = {k: be.asarray(v) for k, v in tensorglot.init_params(CONFIG, 0).items()}
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers run: other thread counts may sum in another order
    try:
        prefilled = [prefill(be, params, CONFIG, req.prompt) for req in reqs[:6]]  # the same, in this process
    finally:
        torch.set_num_threads(threads)
    for req, rec, pre in zip(reqs[:6], out["requests"], prefilled):
        assert rec["error"] is None
        assert rec["tokens"] == _reference(backend, req.prompt, req.max_new_tokens), req.rid
        assert rec["kv_digest_ok"]  # decode's bytes == prefill's bytes
        assert rec["kv_digest"] == digest([a for kv in zip(pre.k, pre.v) for a in kv])
        assert rec["kv_bytes"] == pre.nbytes == 2 * CONFIG.n_layers * len(req.prompt) * 2 * 8 * 4
        assert rec["worker"] in (1, 2) and rec["ttft_s"] > rec["transfer_s"] > 0
    assert out["requests"][6]["error"] and out["requests"][6]["tokens"] == []
    s = out["summary"]
    assert (s["completed"], s["rejected"], s["recomputed"]) == (6, 1, 0)
    assert s["ttft_p50_s"] <= s["ttft_p99_s"] and s["tokens_per_s"] > 0


@pytest.mark.timeout(240)
def test_dead_and_hung_prefill_workers_are_recomputed_with_the_same_tokens(caplog):
    reqs = _workload(6)
    # rank 1 dies at its second request, rank 2 hangs at its second: the decode rank recomputes the rest
    faults = [Fault(1, "die", after=1), Fault(2, "hang", after=1)]
    with caplog.at_level(logging.WARNING, logger="tensorglot.serving"):
        out = serve(reqs, Model("numpy", CONFIG.to_dict(), seed=0), prefill_workers=2, timeout_s=3, faults=faults)
    for req, rec in zip(reqs, out["requests"]):
        assert rec["tokens"] == _reference("numpy", req.prompt, req.max_new_tokens), req.rid
    assert out["summary"]["recomputed"] >= 2
    assert any(r["worker"] == 3 for r in out["requests"])  # recomputed on the decode rank
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "prefill worker rank 1" in logged and "prefill worker rank 2" in logged and "recomputing" in logged
