"""`tensorglot.serving.sampling`: the filtered distributions against a direct SciPy oracle, the draws
against their distribution, and seeds that make a request's tokens repeatable."""

from __future__ import annotations

import numpy as np
import pytest

from tensorglot.serving.sampling import Sampler, SamplingParams, filtered_probs

scipy_special = pytest.importorskip("scipy.special", reason="the oracle is scipy.special.softmax")
scipy_stats = pytest.importorskip("scipy.stats", reason="the draws are checked with scipy.stats.chisquare")


def _logits(seed: int = 0, V: int = 50) -> np.ndarray:
    return np.random.default_rng(seed).normal(scale=2.0, size=V)


def _oracle(logits: np.ndarray, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> np.ndarray:
    """Hugging Face's order, written as loops over a sorted list."""
    p = scipy_special.softmax(logits / temperature)
    ranked = sorted(range(p.size), key=lambda i: (-p[i], i))
    if top_k:
        ranked = ranked[:top_k]
    if top_p < 1:
        total, mass, prefix = sum(p[i] for i in ranked), 0.0, []
        for i in ranked:
            prefix.append(i)
            mass += p[i] / total
            if mass >= top_p:
                break
        ranked = prefix
    if min_p:
        ranked = [i for i in ranked if p[i] >= min_p * p.max()]
    out = np.zeros_like(p)
    out[ranked] = p[ranked]
    return out / out.sum()


@pytest.mark.parametrize(
    "opts",
    [
        dict(temperature=1.0),
        dict(temperature=0.5),
        dict(temperature=1.7, top_k=5),
        dict(top_p=0.9),
        dict(top_p=0.3, temperature=0.8),
        dict(min_p=0.1),
        dict(top_k=10, top_p=0.8, min_p=0.05),
        dict(top_k=1),
    ],
    ids=str,
)
def test_filtered_distribution_equals_the_oracle(opts):
    for seed in range(5):
        logits = _logits(seed)
        np.testing.assert_allclose(filtered_probs(logits, SamplingParams(**opts)), _oracle(logits, **opts), atol=1e-12)


def test_top_p_keeps_the_smallest_prefix_with_enough_mass():
    logits = np.log(np.array([0.1, 0.4, 0.3, 0.2]))
    kept = filtered_probs(logits, SamplingParams(top_p=0.7)) > 0
    assert kept.tolist() == [False, True, True, False]  # 0.4 + 0.3 >= 0.7: two tokens
    kept = filtered_probs(logits, SamplingParams(top_p=0.71)) > 0
    assert kept.tolist() == [False, True, True, True]
    kept = filtered_probs(logits, SamplingParams(top_p=0.01)) > 0
    assert kept.tolist() == [False, True, False, False]  # the most probable is always kept


def test_draws_follow_the_filtered_distribution():
    logits = _logits(3, V=12)
    params = SamplingParams(temperature=0.9, top_k=8, seed=7)
    p = filtered_probs(logits, params)
    sampler = Sampler(params)
    counts = np.bincount([sampler(logits) for _ in range(20000)], minlength=p.size)
    assert counts[p == 0].sum() == 0
    support = p > 0
    result = scipy_stats.chisquare(counts[support], 20000 * p[support])
    assert result.pvalue > 1e-3, (counts, p)


def test_temperature_zero_is_the_first_maximum_and_draws_nothing():
    logits = np.array([0.0, 3.0, 1.0, 3.0])
    sampler = Sampler(SamplingParams(temperature=0.0, seed=1))
    state = sampler.rng.bit_generator.state
    assert [sampler(logits) for _ in range(3)] == [1, 1, 1]
    assert sampler.rng.bit_generator.state == state


def test_a_seed_repeats_and_a_choice_index_differs():
    stream = [_logits(s) for s in range(40)]
    params = SamplingParams(temperature=1.0, seed=123)
    first = [Sampler(params)(x) for x in stream]  # a fresh sampler per token: only the first draw
    a, b, c = Sampler(params), Sampler(params), Sampler(params, choice=1)
    seq_a, seq_b, seq_c = ([s(x) for x in stream] for s in (a, b, c))
    assert seq_a == seq_b
    assert seq_a != seq_c
    assert first[0] == seq_a[0]


@pytest.mark.parametrize(
    "bad, word",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=-2), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(min_p=1.5), "min_p"),
        (dict(seed=-3), "seed"),
        (dict(stop_token_ids=(99,)), "stop_token_ids"),
    ],
    ids=str,
)
def test_out_of_range_parameters_are_named(bad, word):
    with pytest.raises(ValueError, match=word):
        SamplingParams(**bad).check(vocab_size=50)
