"""torch's bench probe: the peak-memory measurement of a fresh process sees exactly a call's new tensors."""

from __future__ import annotations

import functools

import pytest
import torch

from tensorglot_torch.bench import peak_memory


@pytest.mark.slow
def test_cpu_peak_memory_counts_the_output_once_and_not_the_warm_up() -> None:
    x = torch.ones(4 * 2**20)  # 16 MiB of float32
    peak = peak_memory(torch.neg, x)  # one new 16 MiB tensor
    assert 15 * 2**20 <= peak <= 17 * 2**20  # RSS moves by pages the interpreter frees or touches meanwhile
    assert peak_memory(functools.partial(torch.sum, dim=0), x) < 2**20  # a scalar: nothing large
