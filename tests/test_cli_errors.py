"""The CLI's failures: one line ``tensorglot <command>: error: ...`` and a non-zero exit, never a
traceback; flags refuse what they cannot honour before anything runs; ``parallel`` keeps no more than
the last step's result, however many it times."""

from __future__ import annotations

import gc
import json
import os
import tempfile
import weakref
from pathlib import Path

import pytest

import tensorglot_numpy.parallel as numpy_parallel
from tensorglot.bench import cli
from tensorglot.cli import main
from tensorglot.parallel import StepResult
from tensorglot.registry import registry

SMALL = ["--layers", "2", "--batch", "8", "--d-model", "4", "--d-ff", "8"]


def _one_error_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"tensorglot {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--repeats", "0"], "argument --repeats: wanted a positive int, got '0'"),
        (["--repeats", "-2"], "argument --repeats: wanted a positive int, got '-2'"),
        (["--timeout", "0"], "argument --timeout: wanted a positive, finite number of seconds, got '0'"),
        (["--timeout", "-1"], "argument --timeout: wanted a positive, finite number of seconds, got '-1'"),
        (["--timeout", "inf"], "argument --timeout: wanted a positive, finite number of seconds, got 'inf'"),
    ],
)
def test_parallel_refuses_flags_it_cannot_honour_in_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["parallel", "--backend", "numpy", *flags])
    assert exit_.value.code == 2
    assert message in _one_error_line(capsys.readouterr().err, "parallel")


def test_an_unexpected_exception_is_one_line_with_its_type(monkeypatch, capsys):
    def explode(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(numpy_parallel, "single_step", explode)
    assert main(["parallel", "--backend", "numpy", "--strategy", "dp", *SMALL]) == 2
    line = _one_error_line(capsys.readouterr().err, "parallel")
    assert line.endswith("OSError: [Errno 28] No space left on device")


def test_a_timeout_error_is_one_line(monkeypatch, capsys):
    def hang(*args, **kwargs):
        raise TimeoutError("parallel: dp on 2 ranks did not finish in 5 s")

    monkeypatch.setattr(numpy_parallel, "step", hang)
    assert main(["parallel", "--backend", "numpy", "--strategy", "dp", *SMALL]) == 2
    line = _one_error_line(capsys.readouterr().err, "parallel")
    assert line.endswith("TimeoutError: parallel: dp on 2 ranks did not finish in 5 s")


def test_a_multi_line_error_prints_its_first_line(monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise RuntimeError("parallel: rank 1 of 2 failed: boom\nTraceback (most recent call last):\n  ...")

    monkeypatch.setattr(numpy_parallel, "step", fail)
    assert main(["parallel", "--backend", "numpy", "--strategy", "dp", *SMALL]) == 2
    assert _one_error_line(capsys.readouterr().err, "parallel").endswith("rank 1 of 2 failed: boom")


def test_parallel_keeps_only_the_last_result_of_its_repeats(monkeypatch, capsys):
    live, most = [0], {"single": 0, "step": 0}

    def gone() -> None:
        live[0] -= 1

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            gc.collect()
            most[name] = max(most[name], live[0])
            result: StepResult = fn(*args, **kwargs)
            live[0] += 1
            weakref.finalize(result, gone)
            return result

        return wrapped

    monkeypatch.setattr(numpy_parallel, "single_step", counting("single", numpy_parallel.single_step))
    monkeypatch.setattr(numpy_parallel, "step", counting("step", numpy_parallel.step))
    argv = ["parallel", "--backend", "numpy", "--strategy", "dp", "--repeats", "12", "--json", *SMALL]
    assert main(argv) == 0
    # While a step runs, at most the previous one's result and the one-device reference are held.
    assert most["single"] <= 2 and most["step"] <= 3, most


def test_bench_keeps_its_results_when_the_json_path_fails_after_the_run(tmp_path, monkeypatch, capsys):
    row = cli.Row("ops.softmax.fwd_bwd", 1.5, "ms")
    monkeypatch.setattr(cli, "measure_machine", lambda **kw: {"matmul_gflops": 1.0, "bandwidth_gbs": 1.0})
    monkeypatch.setattr(cli, "GROUPS", {"ops": lambda ctx: [row]})
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    target = tmp_path / "out"
    target.mkdir()
    path = target / "run.json"
    # The directory goes away while the bench runs: the check before the run passed.
    monkeypatch.setattr(cli, "format_table", lambda rows: target.rmdir() or "table")
    assert main(["bench", "--backend", "numpy", "--quick", "--json", str(path)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tensorglot bench")]
    assert len(err) == 1 and err[0].startswith(f"tensorglot bench: error: cannot write --json {path}: ")
    spare = err[0].rsplit("the run is in ", 1)[1]
    assert json.loads(Path(spare).read_text())["rows"][0]["name"] == "ops.softmax.fwd_bwd"


@pytest.mark.skipif("plots" not in registry().commands(), reason="needs tensorglot-plots (the plots command)")
@pytest.mark.parametrize("where", ["a file", "under a file", "read-only"])
def test_plots_refuses_an_out_it_cannot_write_before_drawing(where, tmp_path, monkeypatch, capsys):
    import tensorglot_plots

    monkeypatch.setattr(tensorglot_plots, "render", lambda *a: pytest.fail("a figure was drawn"))
    (tmp_path / "file").write_text("")
    out = {"a file": tmp_path / "file", "under a file": tmp_path / "file" / "figs", "read-only": tmp_path / "ro"}[where]
    if where == "read-only":
        out.mkdir(mode=0o500)
        if os.access(out, os.W_OK):
            pytest.skip("this user writes to read-only directories (root)")
    assert main(["plots", "--out", str(out), "--only", "sinusoidal"]) == 2
    line = _one_error_line(capsys.readouterr().err, "plots")
    assert f"plots: cannot write figures to --out {out}: " in line
