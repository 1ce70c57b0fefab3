"""Issue 14: the conformance suite runs for JAX with no environment variable — it prepares the host's
devices itself — and says what float64 needs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("jax", reason="the JAX backend's suite needs jax")


@pytest.mark.timeout(300)
def test_the_jax_suite_prepares_its_devices_and_names_what_float64_needs():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64") and "TENSORGLOT" not in k}
    args = ["--pyargs", "tensorglot.conformance.test_parallel", "tensorglot.conformance.test_ops", "--backend", "jax"]
    pick = "(test_sharded_step_equals_one_device and 4-dp]) or (test_forward_matches_reference and float64-softmax-)"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", *args, "-k", pick, "-rs", "-q", "-p", "no:cacheprovider"],
        capture_output=True,
        text=True,
        env=env,
        timeout=280,
        check=False,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "1 passed" in out  # the 4-device dp step ran on 4 host devices
    assert "lacks capability 'float64' (JAX computes in float64 only with JAX_ENABLE_X64=1" in out
