"""Goodput written once (`tensorglot.serving.goodput`): attainment and goodput by hand, Poisson gaps shared
by the load generator and ``tensorglot serve --rate``, and the colocated loop's chunked prefill, whose
tokens equal `generate` and whose per-token gaps add up to its TPOT.

The colocated runs need no transport; models are tiny.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

import tensorglot
from tensorglot.cli import main
from tensorglot.serving import DEMO_MODEL, Model, Request, goodput, loadgen, serve

CONFIG = tensorglot.TransformerConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=48
)
BACKENDS = [b for b in ("numpy", "torch") if b in tensorglot.available_backends()]


def _reference(backend: str, config: tensorglot.TransformerConfig, prompt: np.ndarray, n: int, seed: int = 0):
    be = tensorglot.get_backend(backend)
    params = {k: be.asarray(v) for k, v in tensorglot.init_params(config, seed).items()}
    out = be.layers.generate(params, config, be.asarray(np.asarray(prompt)[None], dtype="int64"), max_new_tokens=n)
    return be.to_numpy(out)[0, len(prompt) :].tolist()


def test_attainment_and_goodput_by_hand():
    lat = [
        goodput.Latency(0.10, 0.020, 8, itl=[0.01, 0.03]),  # attains
        goodput.Latency(0.50, 0.050, 8),  # on both limits: attains (<=)
        goodput.Latency(0.90, 0.010, 8),  # TTFT too long
        goodput.Latency(0.20, 0.080, 8),  # TPOT too long
        goodput.Latency(0.30, None, 1),  # one token: judged on TTFT alone, attains
        goodput.Latency(None, None, 0, "HTTP 500: boom"),  # failed: counted, never attains
    ]
    row = goodput.summarize(lat, 4.0, slo_ttft=0.5, slo_tpot=0.05)
    assert row["requests"] == 6 and row["completed"] == 5 and row["errors"] == ["HTTP 500: boom"]
    assert row["slo_attainment"] == pytest.approx(3 / 6) and row["goodput_rps"] == pytest.approx(3 / 4)
    assert row["requests_per_s"] == pytest.approx(5 / 4) and row["tokens_per_s"] == pytest.approx(33 / 4)
    assert row["ttft_p50_s"] == pytest.approx(0.30)  # the median of 0.1, 0.2, 0.3, 0.5, 0.9
    assert row["tpot_p99_s"] == pytest.approx(np.percentile([0.02, 0.05, 0.01, 0.08], 99))
    assert row["itl_p50_s"] == pytest.approx(0.02) and row["itl_p99_s"] == pytest.approx(0.0298)
    empty = goodput.summarize([], 1.0, slo_ttft=1, slo_tpot=1)
    assert empty["slo_attainment"] is None and empty["ttft_p50_s"] is None and empty["goodput_rps"] == 0
    with pytest.raises(ValueError, match="wall_s must be > 0, got 0"):
        goodput.summarize(lat, 0, slo_ttft=1, slo_tpot=1)


def test_a_batch_record_and_a_load_generator_record_give_the_same_row():
    rec = loadgen.Record(prompt_len=4, sent=10.0, chunks=[10.2, 10.25, 10.4], tokens=3)
    batch = {"ttft_s": 0.2, "tpot_s": 0.1, "tokens": [1, 2, 3], "error": None, "itl_s": [0.05, 0.15]}
    a = goodput.summarize([rec.latency()], 1.0, slo_ttft=0.3, slo_tpot=0.11)
    b = goodput.summarize([goodput.from_record(batch)], 1.0, slo_ttft=0.3, slo_tpot=0.11)
    assert a.pop("errors") == b.pop("errors") == []
    assert a == pytest.approx(b) and a["goodput_rps"] == 1.0


def test_poisson_gaps_are_exponential_with_mean_one_over_the_rate():
    gaps = goodput.poisson_gaps(np.random.default_rng(0), 4000, 8.0)
    assert stats.kstest(gaps, stats.expon(scale=1 / 8).cdf).pvalue > 0.01
    assert stats.kstest(gaps, stats.expon(scale=1 / 4).cdf).pvalue < 1e-6  # the test can fail
    for bad in (0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="rate must be a positive, finite number"):
            goodput.poisson_gaps(np.random.default_rng(0), 3, bad)


def test_the_load_generator_and_serve_rate_draw_the_same_gaps_from_a_seed():
    gaps, prompts = loadgen.workload(5, 4.0, prompt_len=(3, 9), vocab=64, seed=7)
    again, same = loadgen.workload(5, 4.0, prompt_len=(3, 9), vocab=64, seed=7)
    np.testing.assert_array_equal(gaps, again)
    assert prompts == same and all(3 <= len(p) <= 9 and max(p) < 64 for p in prompts)
    np.testing.assert_array_equal(gaps, goodput.poisson_gaps(np.random.default_rng(7), 5, 4.0))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
def test_colocated_chunked_prefill_gives_generate_tokens_and_its_gaps_sum_to_tpot(backend):
    rng = np.random.default_rng(0)
    reqs = [
        Request(i, rng.integers(0, CONFIG.vocab_size, size=int(rng.integers(1, 30))), int(rng.integers(1, 12)),
                arrival_s=0.002 * i)
        for i in range(7)
    ]  # fmt: skip
    out = serve(reqs, Model(backend, CONFIG.to_dict()), colocated=True, prefill_chunk=4)
    assert out["summary"]["mode"] == "colocated (chunked prefill, 4 tokens)"
    for req, rec in zip(reqs, out["requests"]):
        assert rec["tokens"] == _reference(backend, CONFIG, req.prompt, req.max_new_tokens), req.rid
        assert len(rec["itl_s"]) == len(rec["tokens"]) - 1
        if rec["tpot_s"] is not None:
            assert np.mean(rec["itl_s"]) == pytest.approx(rec["tpot_s"], rel=1e-9, abs=1e-12)


def test_serve_refuses_a_chunk_without_colocated_and_a_bad_chunk():
    req = [Request(0, np.array([1, 2]), 2)]
    with pytest.raises(ValueError, match="needs colocated=True"):
        serve(req, Model("numpy", CONFIG.to_dict()), prefill_chunk=4)
    with pytest.raises(ValueError, match="prefill_chunk must be an int >= 1 or None, got 0"):
        serve(req, Model("numpy", CONFIG.to_dict()), colocated=True, prefill_chunk=0)


@pytest.mark.timeout(120)
def test_serve_cli_rate_and_prefill_chunk_give_generate_tokens(capsys):
    argv = ["serve", "--backend", "numpy", "--colocated", "--prefill-chunk", "16", "--rate", "50", "--requests", "4",
            "--prompt-len", "8:64", "--max-new-tokens", "3", "--json"]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)

    config = tensorglot.TransformerConfig(**DEMO_MODEL)
    for rec in out["requests"]:
        assert rec["tokens"] == _reference("numpy", config, np.array(rec["prompt"]), 3)
        assert len(rec["itl_s"]) == 2
    assert out["summary"]["mode"] == "colocated (chunked prefill, 16 tokens)"


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--rate", "0"], "argument --rate: wanted a positive, finite number of requests/s, got '0'"),
        (["--rate", "2", "--arrival-interval", "0.1"], "not allowed with argument"),
        (["--prefill-chunk", "0"], "argument --prefill-chunk: wanted a positive int, got '0'"),
    ],
)
def test_serve_refuses_bad_arrival_and_chunk_flags_in_one_line(flags, message, capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--backend", "numpy", "--colocated", *flags])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_serve_cli_refuses_a_chunk_for_the_disaggregated_run(capsys):
    assert main(["serve", "--backend", "numpy", "--prefill-chunk", "8"]) == 2
    err = capsys.readouterr().err
    assert "--prefill-chunk in batch mode needs --colocated" in err and "Traceback" not in err
