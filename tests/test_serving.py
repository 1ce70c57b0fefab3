"""`tensorglot.serving`: tokens equal `generate` on every backend with layers, the paged pool keeps what
prefill computed and gives every block back, KV arrives bit for bit, faults are recomputed.

The engine and the colocated loop need no transport; the disaggregated runs use the installed one
(tensorglot-torch's ``torch.distributed``) and skip, naming it, without. Models are tiny: the point
is the bookkeeping.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

import tensorglot
from tensorglot.registry import registry
from tensorglot.serving import DecodeEngine, Fault, Model, Request, Sequence, prefill, serve
from tensorglot.serving.engine import Prefilled
from tensorglot.serving.transport import digest

CONFIG = tensorglot.TransformerConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=48
)
BACKENDS = [b for b in ("numpy", "torch", "jax") if b in tensorglot.available_backends()]
#: the in-process engine's tests also run on xp, whose cache write is the only one written without a scatter
ENGINE_BACKENDS = BACKENDS + [b for b in ("xp",) if b in tensorglot.available_backends()]
needs_transport = pytest.mark.skipif(
    not registry().transports(), reason="needs a serving transport (tensorglot-torch provides one)"
)


def _model(backend: str):
    be = tensorglot.get_backend(backend)
    return be, {k: be.asarray(v) for k, v in tensorglot.init_params(CONFIG, 0).items()}


def _reference(backend: str, prompt: np.ndarray, n: int) -> list[int]:
    be, params = _model(backend)
    out = be.to_numpy(be.layers.generate(params, CONFIG, be.asarray(prompt[None], dtype="int64"), max_new_tokens=n))
    return out[0, len(prompt) :].tolist()


def _workload(n: int, seed: int = 0, lengths: tuple[int, ...] | None = None) -> list[Request]:
    rng = np.random.default_rng(seed)
    reqs = []
    for i in range(n):
        P = int(rng.choice(lengths)) if lengths else int(rng.integers(1, 24))
        new = int(rng.integers(1, 12))
        reqs.append(Request(i, rng.integers(0, CONFIG.vocab_size, size=P), new, arrival_s=0.003 * i))
    return reqs


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", ENGINE_BACKENDS)
def test_continuous_batching_on_the_paged_pool_equals_generate(backend):
    """Requests of different lengths join and leave the decode batch between steps."""
    be, params = _model(backend)
    engine = DecodeEngine(be, params, CONFIG, max_batch=4, block_size=4)
    reqs = _workload(7, seed=1, lengths=(3, 11, 17) if backend == "jax" else None)  # jax compiles per length
    pending, done = list(reqs), {}
    while pending or engine.active:
        if pending and engine.can_admit(len(pending[0].prompt), pending[0].max_new_tokens):
            req = pending.pop(0)  # one joins per step: the batch holds sequences of different lengths
            pre = prefill(be, params, CONFIG, req.prompt)
            seq = Sequence(req.rid, len(req.prompt), req.max_new_tokens, [pre.first_token], 0.0)
            for s in engine.admit(seq, pre.k, pre.v):
                done[s.rid] = s.tokens
        if engine.active:
            assert len(engine.active) <= 4
            for s in engine.step():
                done[s.rid] = s.tokens
    for req in reqs:
        assert done[req.rid] == _reference(backend, req.prompt, req.max_new_tokens), req.rid
    assert engine.pool.free_blocks() == engine.pool.num_blocks  # every block came back
    assert not engine.pool.rows


def _engine_with_one_request(backend: str, *, rid: int, prompt_len: int) -> tuple[DecodeEngine, Prefilled]:
    """A 3-row engine of blocks of 4 holding request ``rid`` (prompt arange(prompt_len), 5 new tokens)."""
    be, params = _model(backend)
    engine = DecodeEngine(be, params, CONFIG, max_batch=3, block_size=4)
    pre = prefill(be, params, CONFIG, np.arange(prompt_len))
    engine.admit(Sequence(rid, prompt_len, 5, [pre.first_token], 0.0), pre.k, pre.v)
    return engine, pre


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ENGINE_BACKENDS)
def test_pool_stores_what_prefill_computed_and_idle_rows_hold_no_block(backend):
    engine, pre = _engine_with_one_request(backend, rid=7, prompt_len=10)
    k, v = engine.pool.read(7)
    assert all(np.array_equal(a, b) for a, b in zip(k + v, pre.k + pre.v))
    assert engine.pool.table(7) == [0, 1, 2]  # ceil(10 / 4) blocks, lowest first
    engine.step()  # two idle rows run too, writing only to the scratch block
    assert engine.pool.map.lengths().tolist() == [11, 0, 0]
    assert engine.pool.free_blocks() == engine.pool.num_blocks - 3
    k2, _ = engine.pool.read(7)
    assert all(np.array_equal(a[:10], b) for a, b in zip(k2, pre.k))  # the prompt's keys are untouched


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ENGINE_BACKENDS)
def test_pool_writes_two_prompts_in_one_round_beside_a_running_row(backend):
    engine, _ = _engine_with_one_request(backend, rid=1, prompt_len=6)
    be, params = engine.be, engine.params
    engine.step()  # row 0 runs: it holds 7 tokens
    before, _ = engine.pool.read(1)
    a, b = prefill(be, params, CONFIG, np.arange(9) + 3), prefill(be, params, CONFIG, np.arange(2) + 1)
    engine.pool.write({5: (a.k, a.v), 6: (b.k, b.v)})
    assert engine.pool.map.lengths().tolist() == [7, 9, 2]
    for rid, pre in ((5, a), (6, b)):
        k, v = engine.pool.read(rid)
        assert all(np.array_equal(x, y) for x, y in zip(k + v, pre.k + pre.v)), rid
    after, _ = engine.pool.read(1)
    assert all(np.array_equal(x, y) for x, y in zip(after, before))  # the running row is untouched


def test_pool_write_of_keys_of_the_wrong_shape_says_which():
    be, params = _model("numpy")
    engine = DecodeEngine(be, params, CONFIG, max_batch=2, block_size=4)
    pre = prefill(be, params, CONFIG, np.arange(5))
    with pytest.raises(ValueError, match=r"request 3's k and v must be 2 arrays \(P, K, H\)"):
        engine.pool.write({3: (pre.k, [x[:4] for x in pre.v])})
    assert engine.pool.free_blocks() == engine.pool.num_blocks and not engine.pool.rows


def test_pool_write_past_its_blocks_raises_and_changes_nothing():
    be, params = _model("numpy")
    engine = DecodeEngine(be, params, CONFIG, max_batch=2, block_size=4, num_blocks=3)
    pre = prefill(be, params, CONFIG, np.arange(13))  # 4 blocks of 4 > 3
    with pytest.raises(ValueError, match="4 new blocks of 4 needed but only 3 of 3 are free"):
        engine.pool.write({0: (pre.k, pre.v)})
    assert engine.pool.free_blocks() == 3 and not engine.pool.rows and engine.pool.map.staged is None
    assert not engine.can_admit(13, 1)


@pytest.mark.timeout(120)
def test_colocated_tokens_equal_generate_and_long_requests_are_rejected():
    reqs = [*_workload(4), Request(4, np.arange(40), 9)]  # 40 + 9 > max_seq_len = 48
    out = serve(reqs, Model("numpy", CONFIG.to_dict(), seed=0), colocated=True)
    for req, rec in zip(reqs[:4], out["requests"]):
        assert rec["tokens"] == _reference("numpy", req.prompt, req.max_new_tokens)
    assert out["requests"][4]["tokens"] == []
    assert "longer than the model's context (max_seq_len = 48)" in out["requests"][4]["error"]
    assert out["summary"]["completed"] == 4 and out["summary"]["rejected"] == 1


@needs_transport
@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", BACKENDS)
def test_disaggregated_tokens_equal_generate_and_kv_arrives_bit_for_bit(backend):
    reqs = [*_workload(6, lengths=(5, 12) if backend == "jax" else None), Request(6, np.arange(45) % 64, 10)]
    reqs[2].max_new_tokens = 1  # done by prefill alone
    out = serve(reqs, Model(backend, CONFIG.to_dict(), seed=0), prefill_workers=2, timeout_s=60)
    for req, rec in zip(reqs[:6], out["requests"]):
        assert rec["error"] is None
        assert rec["tokens"] == _reference(backend, req.prompt, req.max_new_tokens), req.rid
        assert rec["kv_digest_ok"]  # decode's bytes == prefill's bytes
        assert rec["kv_bytes"] == 2 * CONFIG.n_layers * len(req.prompt) * 2 * 8 * 4
        assert rec["worker"] in (1, 2) and rec["ttft_s"] > rec["transfer_s"] > 0
        # the decode worker times each token: the gaps between them add up to the TPOT
        assert len(rec["itl_s"]) == len(rec["tokens"]) - 1 and min(rec["itl_s"], default=0) >= 0
        if rec["tpot_s"] is not None:
            assert np.mean(rec["itl_s"]) == pytest.approx(rec["tpot_s"], rel=1e-6, abs=1e-6)
    assert out["requests"][6]["error"] and out["requests"][6]["tokens"] == []
    s = out["summary"]
    assert (s["completed"], s["rejected"], s["recomputed"]) == (6, 1, 0)
    assert s["ttft_p50_s"] <= s["ttft_p99_s"] and s["tokens_per_s"] > 0
    assert 0 < s["itl_p50_s"] <= s["itl_p99_s"]


@needs_transport
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_kv_digest_is_the_digest_of_what_prefill_computes():
    reqs = _workload(3)
    out = serve(reqs, Model("numpy", CONFIG.to_dict(), seed=0), timeout_s=60)
    be, params = _model("numpy")
    for req, rec in zip(reqs, out["requests"]):
        assert rec["kv_digest"] == digest(prefill(be, params, CONFIG, req.prompt).arrays)


@needs_transport
@pytest.mark.distributed
@pytest.mark.timeout(300)
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


def test_an_unknown_transport_names_the_installed_ones():
    with pytest.raises(ValueError, match="unknown transport 'pigeon'; installed transports:"):
        serve([Request(0, np.arange(3), 2)], Model("numpy", CONFIG.to_dict()), transport="pigeon")


BAD_PROMPTS = {
    "a 2-D prompt": ([[1, 2], [3, 4]], "must be 1-D (a list of token ids), got shape (2, 2)"),
    "a float id": ([1.7, 2.0], "token ids must be ints, got float64 values: [1.7, 2.0]"),
    "an id past the vocabulary": ([3, 64], "token ids must lie in [0, 64), got [3, 64]"),
    "a negative id": ([-1, 3], "token ids must lie in [0, 64), got [-1, 3]"),
    "an id too large for int64": ([1, 10**30], f"token ids must lie in [0, 64), got [1, {10**30}]"),
    "an empty prompt": ([], "needs a prompt of >= 1 token, got an empty one"),
    "a ragged prompt": ([[1, 2], [3]], "must be a flat list of token ids, got [[1, 2], [3]]"),
    "a bare int": (5, "must be 1-D (a list of token ids), got shape ()"),
    "bools": ([True, False], "token ids must be ints, got bool values"),
}


@pytest.mark.timeout(120)
def test_each_malformed_request_fails_alone_with_its_reason():
    good = [Request(0, np.array([1, 2, 3]), 3), Request(1, [4, 5], 2)]  # a plain list of ints is fine
    bad = [Request(i, prompt, 2) for i, (prompt, _) in enumerate(BAD_PROMPTS.values(), start=2)]
    bad.append(Request(len(bad) + 2, [1, 2], 2.5))  # type: ignore[arg-type]
    out = serve([*good, *bad], Model("numpy", CONFIG.to_dict(), seed=0), colocated=True)
    recs = out["requests"]
    for req, rec in zip(good, recs):
        assert rec["error"] is None and rec["tokens"] == _reference("numpy", np.asarray(req.prompt), req.max_new_tokens)
    for (what, (_, reason)), rec in zip(BAD_PROMPTS.items(), recs[2:]):
        assert rec["tokens"] == [] and rec["error"].startswith(f"request {rec['id']}: "), what
        assert reason in rec["error"], (what, rec["error"])
    assert "max_new_tokens must be an int >= 1, got 2.5" in recs[-1]["error"]
    assert (out["summary"]["completed"], out["summary"]["rejected"]) == (2, len(bad))


@pytest.mark.parametrize("timeout", [0, -1.0, float("inf"), float("nan")])
def test_serve_refuses_a_timeout_it_cannot_honour(timeout):
    with pytest.raises(ValueError, match="serve: timeout_s must be a positive, finite number of seconds"):
        serve([Request(0, np.arange(3), 2)], Model("numpy", CONFIG.to_dict()), timeout_s=timeout)


@needs_transport
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_two_decode_workers_share_the_load_and_tokens_equal_generate():
    reqs = _workload(8)
    for r in reqs:
        r.arrival_s = 0.0  # the first two are routed back to back: to rank 2, then to the less loaded rank 3
    out = serve(reqs, Model("numpy", CONFIG.to_dict(), seed=0), prefill_workers=1, decode_workers=2, timeout_s=60)
    for req, rec in zip(reqs, out["requests"]):
        assert rec["error"] is None and rec["kv_digest_ok"]
        assert rec["tokens"] == _reference("numpy", req.prompt, req.max_new_tokens), req.rid
        assert rec["worker"] == 1 and rec["decode_worker"] in (2, 3)
    assert [rec["decode_worker"] for rec in out["requests"][:2]] == [2, 3]
    assert out["summary"]["mode"] == "disaggregated (1 prefill + 2 decode)"


def test_router_routes_by_outstanding_work():
    from tensorglot.serving.router import work

    assert work(Request(0, np.arange(10), 7), block_size=4) == 7 + 4  # 16 tokens of budget: 4 blocks
    assert work(Request(1, np.arange(1), 1), block_size=16) == 1 + 1


@needs_transport
@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("prefix_blocks", [64, 0], ids=["prefix-aware", "no-cache"])
def test_a_shared_prefix_is_routed_to_the_prefill_worker_that_holds_it(prefix_blocks):
    rng = np.random.default_rng(3)
    shared = {g: rng.integers(0, CONFIG.vocab_size, size=32) for g in "ab"}  # two full blocks of 16 each
    groups = "ababab"
    reqs = [
        Request(i, np.concatenate([shared[g], rng.integers(0, CONFIG.vocab_size, size=2 + i % 3)]), 3,
                arrival_s=0.0 if i < 2 else 0.3 * i)
        for i, g in enumerate(groups)
    ]  # fmt: skip
    out = serve(reqs, Model("numpy", CONFIG.to_dict(), seed=0), prefill_workers=2, prefix_blocks=prefix_blocks,
                timeout_s=60)  # fmt: skip
    recs = out["requests"]
    for req, rec in zip(reqs, recs):
        assert rec["tokens"] == _reference("numpy", req.prompt, req.max_new_tokens), req.rid
    cached = [rec["prefill_cached_tokens"] for rec in recs]
    if prefix_blocks:
        # a and b arrive together and go to ranks 1 and 2; each later one goes where its prefix is
        assert [rec["worker"] for rec in recs] == [1, 2, 1, 2, 1, 2]
        assert cached == [0, 0, 32, 32, 32, 32]  # 128 of 6 * 32 + 12 prompt tokens not computed again
        # the decode worker holds each prefix with rank 1's and rank 2's bits: their KV is not sent again
        assert [rec["decode_cached_tokens"] for rec in recs] == [0, 0, 32, 32, 32, 32]
    else:
        assert cached == [0] * 6 and [rec["decode_cached_tokens"] for rec in recs] == [0] * 6
