"""sinusoidal and rope_frequencies against the reference and against their closed forms."""

from __future__ import annotations

import numpy as np
import pytest

from ._harness import assert_close

SCALINGS = [
    None,
    {"type": "linear", "factor": 4.0},
    {"type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 128, "seq_len": 512},
    {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256, "beta_fast": 32, "beta_slow": 1},
    {
        "type": "llama3",
        "factor": 8.0,
        "original_max_position_embeddings": 8192,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
    },
]


@pytest.mark.parametrize("seq_len,dim,base", [(7, 8, 10000.0), (1, 2, 100.0), (0, 4, 10000.0), (33, 64, 500.0)])
def test_sinusoidal_matches_the_paper(backend, seq_len, dim, base):
    pe = np.asarray(backend.to_numpy(backend.encodings.sinusoidal(seq_len, dim, base=base)), dtype=np.float64)
    assert pe.shape == (seq_len, dim)
    p = np.arange(seq_len)[:, None]
    i = np.arange(dim // 2)[None, :]
    angle = p / base ** (2 * i / dim)  # the paper's formula, written independently of the backends
    assert_close(pe[:, 0::2], np.sin(angle), "float32", what="PE[p, 2i] = sin")
    assert_close(pe[:, 1::2], np.cos(angle), "float32", what="PE[p, 2i+1] = cos")


def test_sinusoidal_dtype(backend, dtype):
    pe = backend.encodings.sinusoidal(4, 6, dtype=dtype)
    assert backend.dtype_name(pe) == dtype


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: "none" if s is None else s["type"])
def test_rope_frequencies_match_reference(backend, reference, scaling):
    got = np.asarray(backend.to_numpy(backend.encodings.rope_frequencies(64, theta=500000.0, scaling=scaling)))
    want = reference.encodings.rope_frequencies(64, theta=500000.0, scaling=scaling, dtype="float64")
    assert got.shape == (32,)
    assert_close(got, want, "float32", what="rope_frequencies")


def test_rope_frequencies_unscaled_closed_form(backend):
    got = np.asarray(backend.to_numpy(backend.encodings.rope_frequencies(8, theta=10000.0, dtype="float32")))
    assert_close(got, [1.0, 0.1, 0.01, 0.001], "float32", what="theta^(-2i/dim)")


def test_rope_frequencies_llama3_bands(backend):
    """Llama 3.1: wavelengths shorter than L/high keep their frequency, longer than L/low are divided by
    the factor, and the band between is interpolated (so it lies between the two)."""
    s = SCALINGS[4]
    base = np.asarray(backend.to_numpy(backend.encodings.rope_frequencies(128, theta=500000.0)), dtype=np.float64)
    got = np.asarray(backend.to_numpy(backend.encodings.rope_frequencies(128, theta=500000.0, scaling=s)))
    wavelen = 2 * np.pi / base
    high = wavelen < 8192 / 4.0
    low = wavelen > 8192 / 1.0
    assert_close(got[high], base[high], "float32", what="high-frequency band unchanged")
    assert_close(got[low], base[low] / 8.0, "float32", what="low-frequency band divided by factor")
    mid = ~high & ~low
    assert mid.any()
    assert np.all(got[mid] <= base[mid] * (1 + 1e-6)) and np.all(got[mid] >= base[mid] / 8.0 * (1 - 1e-6))


def test_rope_frequencies_yarn_extremes(backend):
    """YaRN keeps the fastest-rotating pairs (extrapolation) and interpolates the slowest by 1/factor."""
    s = SCALINGS[3]
    base = np.asarray(backend.to_numpy(backend.encodings.rope_frequencies(64, theta=10000.0)), dtype=np.float64)
    got = np.asarray(backend.to_numpy(backend.encodings.rope_frequencies(64, theta=10000.0, scaling=s)))
    assert_close(got[:1], base[:1], "float32", what="the fastest pair extrapolated")
    assert_close(got[-2:], base[-2:] / 8.0, "float32", what="slow pairs interpolated")
