"""Every installed backend with the ``layers`` capability gives the NumPy reference's logits, loss and
gradient for the same config and params (new backends join through `tensorglot.available_backends`)."""

from __future__ import annotations

import numpy as np
import pytest

import tensorglot
from tensorglot import TransformerConfig, init_params

CONFIG = TransformerConfig(
    vocab_size=23,
    d_model=16,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=4,
    d_ff=24,
    activation="swiglu",
    rope_style="neox",
    max_seq_len=32,
)
OTHERS = [name for name in tensorglot.available_backends() if name != "numpy"]


@pytest.fixture(params=OTHERS)
def backend(request):
    be = tensorglot.get_backend(request.param)
    if "layers" not in be.capabilities:
        pytest.skip(f"backend {be.name!r} lacks capability 'layers'")
    return be


def test_some_backend_besides_numpy_is_installed():
    # Without one, the agreement tests below would not run at all; the tests session installs them all.
    assert OTHERS, "no backend besides numpy is installed"


def test_logits_agree_with_numpy(backend):
    dtype = "float64" if "float64" in backend.capabilities else "float32"
    params = init_params(CONFIG, 11, dtype=dtype)
    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (3, 12)).astype(np.int32)
    want = tensorglot.get_backend("numpy").layers.transformer(tokens, params, CONFIG)
    got = backend.layers.transformer(
        backend.asarray(tokens), {k: backend.asarray(v) for k, v in params.items()}, CONFIG
    )
    rtol = 1e-10 if dtype == "float64" else 2e-5  # float32: ~25 ops each rounding
    np.testing.assert_allclose(np.asarray(backend.to_numpy(got)), want, rtol=rtol, atol=rtol)


def test_generated_tokens_agree_with_numpy(backend):
    params = init_params(CONFIG, 12, dtype="float64" if "float64" in backend.capabilities else "float32")
    prompt = np.random.default_rng(1).integers(0, CONFIG.vocab_size, (2, 4)).astype(np.int32)
    want = tensorglot.get_backend("numpy").layers.generate(params, CONFIG, prompt, max_new_tokens=8)
    got = backend.layers.generate(
        {k: backend.asarray(v) for k, v in params.items()}, CONFIG, backend.asarray(prompt), max_new_tokens=8
    )
    np.testing.assert_array_equal(np.asarray(backend.to_numpy(got)).astype(np.int64), want)


def test_loss_and_gradients_agree_with_numpy(backend):
    dtype = "float64" if "float64" in backend.capabilities else "float32"
    params = init_params(CONFIG, 13, dtype=dtype)
    rng = np.random.default_rng(2)
    tokens, targets = (rng.integers(0, CONFIG.vocab_size, (2, 10)).astype(np.int32) for _ in range(2))
    want_loss, want = tensorglot.get_backend("numpy").layers.value_and_grad(tokens, targets, params, CONFIG)
    loss, grads = backend.layers.value_and_grad(
        backend.asarray(tokens), backend.asarray(targets), {k: backend.asarray(v) for k, v in params.items()}, CONFIG
    )
    rtol = 1e-10 if dtype == "float64" else 1e-4
    np.testing.assert_allclose(float(np.asarray(backend.to_numpy(loss))), float(want_loss), rtol=rtol)
    for k in params:
        np.testing.assert_allclose(np.asarray(backend.to_numpy(grads[k])), want[k], rtol=rtol, atol=rtol, err_msg=k)
