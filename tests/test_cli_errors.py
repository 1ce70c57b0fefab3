"""The CLI's failures: one line ``tensorglot <command>: error: ...`` and a non-zero exit, never a
traceback; flags refuse what they cannot honour before anything runs; ``parallel`` keeps no more than
the last step's result, however many it times."""

from __future__ import annotations

import gc
import weakref

import pytest

import tensorglot_numpy.parallel as numpy_parallel
from tensorglot.cli import main
from tensorglot.parallel import StepResult

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
