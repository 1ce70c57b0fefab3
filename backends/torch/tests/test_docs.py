"""The examples in the torch backend's docstrings run."""

from __future__ import annotations

import doctest

from tensorglot_torch import nn


def test_nn_docstring_example_runs():
    result = doctest.testmod(nn, verbose=False)
    assert result.attempted > 0 and result.failed == 0
