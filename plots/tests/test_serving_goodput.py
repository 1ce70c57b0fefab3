"""The goodput figure draws the sweep it is given: the committed one by default (the run docs/serving.md
quotes), another through ``TENSORGLOT_GOODPUT_JSON``; a file that is no sweep is one clear error."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

import tensorglot
from tensorglot_plots import serving_goodput, style


def test_the_committed_sweep_is_what_the_figure_draws() -> None:
    sweep = json.loads(serving_goodput.SWEEP.read_text())
    d = serving_goodput.data(tensorglot.get_backend("numpy"))
    assert list(d["rates"]) == list(sweep["modes"]) and "colocated" in d["rates"]
    for mode in sweep["modes"]:
        rows = [r for r in sweep["rows"] if r["mode"] == mode]
        np.testing.assert_array_equal(d["goodput"][mode], [r["goodput_rps"] for r in rows])
        np.testing.assert_array_equal(d["attainment"][mode], [r["slo_attainment"] for r in rows])
        assert all(r["same_tokens"] for r in rows)  # the modes served the same requests alike
    assert d["best_ratio"] == sweep["best_ratio"] and d["slo"] == sweep["slo"]


def test_another_sweep_through_the_environment(tmp_path: Any, monkeypatch: Any) -> None:
    sweep = json.loads(serving_goodput.SWEEP.read_text())
    for row in sweep["rows"]:
        row["goodput_rps"] = 0.25
    path = tmp_path / "other.json"
    path.write_text(json.dumps(sweep))
    monkeypatch.setenv("TENSORGLOT_GOODPUT_JSON", str(path))
    d = serving_goodput.data(tensorglot.get_backend("numpy"))
    assert all(np.all(g == 0.25) for g in d["goodput"].values())
    style.save(serving_goodput.draw(d), tmp_path / "other.png")
    assert (tmp_path / "other.png").stat().st_size > 20_000


@pytest.mark.parametrize("content,message", [(None, "cannot read the sweep"), ("{}", "is not a tensorglot")])
def test_a_file_that_is_no_sweep_is_one_clear_error(content: str | None, message: str, tmp_path: Any) -> None:
    path = tmp_path / "sweep.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        serving_goodput.load(path)
