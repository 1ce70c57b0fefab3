"""Every session of the project. `nox -l` lists them; the README's commands are `nox -s plots` (figures)
and `nox -s lint typecheck tests conformance` (tests).

Each conformance environment holds only one backend plus the NumPy reference, so a stray import of
another framework fails there. torch is pinned through constraints.txt to the 2.13.0 CPU wheel.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import nox

ROOT = Path(__file__).parent
nox.options.default_venv_backend = "virtualenv"
nox.options.sessions = ["lint", "typecheck", "tests", "conformance"]

ALL_BACKENDS = ["numpy", "torch", "jax", "xp"]
BACKENDS = [b for b in ALL_BACKENDS if (ROOT / "backends" / b / "pyproject.toml").exists()]
# xp has no benchmark table: it is the proof that the standard suffices, not a fast path.
# The namespaces the xp backend's conformance runs on (TENSORGLOT_XP_NAMESPACE): the bare standard, and NumPy.
XP_NAMESPACES = ("array_api_strict", "numpy")
HAS_PLOTS = (ROOT / "plots" / "pyproject.toml").exists()
CONSTRAINTS = ("-c", "constraints.txt")
TEST_DEPS = ("pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "hypothesis>=6.100")
# Serving's stack (the spec's `serve` extra: checkpoints, progress, the HTTP server) and the clients its tests use.
SERVE_DEPS = ("safetensors", "tqdm", "tokenizers", "jinja2", "starlette", "uvicorn", "openai", "httpx")
# One BLAS/OpenMP thread per process: tests and figures start several processes (ranks, workers) on few
# cores, and oversubscribed thread pools there cost 10× more than they give. Benchmarks keep the default.
SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# JAX on CPU sees one device unless told before it starts; the sharded steps run on 4.
FAKE_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
#: typecheck's and tests' environment (`_shared_env`)
SHARED_ENV = ROOT / ".nox" / "shared-typecheck-tests"


@contextlib.contextmanager
def _ci_disk(session: nox.Session, location: Path | None = None) -> Iterator[None]:
    """In CI, delete the session's environment (or ``location``) when it ends, passed or failed.

    The sessions' environments hold ~6 GB together (torch and jax each in three of them); a CI
    machine once ran out of disk before the third one was built. One at a time needs ~2 GB.
    """
    try:
        yield
    finally:
        where = location or getattr(session.virtualenv, "location", None)
        if os.environ.get("CI") and where and Path(where).is_dir():
            shutil.rmtree(where, ignore_errors=True)


def _shared_env(session: nox.Session) -> Path:
    """The one environment typecheck and tests share (everything: the spec, every backend editable, the
    plots, mypy, the tests' and serving's packages), made by whichever runs first; its bin/ goes first on
    the PATH of what the session runs (nox itself looks programs up on its own PATH: the sessions name
    the environment's). Installing torch, jax and transformers costs ~2 minutes of CI's 30: once, not twice."""
    env = SHARED_ENV
    python = env / "bin" / "python"
    if not python.exists():
        session.run(sys.executable, "-m", "virtualenv", "-q", str(env), external=True)
        extra = ["-e", "./plots"] if HAS_PLOTS else []
        deps = (*TEST_DEPS, *SERVE_DEPS, "transformers", "mypy")
        pip = (str(python), "-m", "pip", "install", "-q")
        session.run(*pip, *CONSTRAINTS, *_packages(*BACKENDS, editable=True), *extra, *deps, external=True)
    session.env["PATH"] = os.pathsep.join((str(env / "bin"), os.environ.get("PATH", "")))
    session.env["VIRTUAL_ENV"] = str(env)
    return env


def _packages(*backends: str, editable: bool = False) -> list[str]:
    """The pip arguments that install the spec, the reference and the given backends."""
    paths = ["./spec[conformance]", "./backends/numpy"] + [f"./backends/{b}" for b in backends if b != "numpy"]
    if not editable:
        return paths
    return [arg for p in paths for arg in ("-e", p)]


@nox.session
@nox.parametrize("backend", BACKENDS, ids=BACKENDS)
def conformance(session: nox.Session, backend: str) -> None:
    """The conformance suite against one backend, in an environment with only that backend."""
    with _ci_disk(session):
        session.install(*CONSTRAINTS, *_packages(backend))
        session.env.update(SINGLE_THREAD)
        if backend == "jax":
            # float64 (the reference dtype, central differences) and 4 fake CPU devices for the sharded steps;
            # both must be set before jax initialises.
            session.env["JAX_ENABLE_X64"] = "1"
            session.env.update(FAKE_DEVICES)
        xfails = ROOT / "backends" / backend / "conformance-xfails.txt"
        suite = ("--pyargs", "tensorglot.conformance", "--backend", backend, "--xfails", str(xfails))
        # xp runs once per namespace (tensorglot-xp depends on array-api-strict); the others once.
        runs = [{"TENSORGLOT_XP_NAMESPACE": ns} for ns in XP_NAMESPACES] if backend == "xp" else [{}]
        for env in runs:
            session.run("pytest", *suite, "-p", "no:cacheprovider", "--durations=15", *session.posargs, env=env)


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """Doctests of the spec, the cross-package tests, each backend's own tests, the plots' tests."""
    env = _shared_env(session)
    pytest = str(env / "bin" / "pytest")
    with _ci_disk(session, env):
        session.env.update(SINGLE_THREAD | FAKE_DEVICES)
        session.run(
            pytest,
            "--doctest-modules",
            "spec/src/tensorglot",
            "--ignore=spec/src/tensorglot/conformance",
            "-p",
            "no:cacheprovider",
            external=True,
        )
        paths = ["tests"] + [f"backends/{b}/tests" for b in BACKENDS if (ROOT / "backends" / b / "tests").exists()]
        if HAS_PLOTS:
            paths.append("plots/tests")
        # one worker per CPU: most tests wait on a process, a compiler or one thread (CI stays under 30 minutes)
        # --durations: the slowest tests in CI's log, which has 30 minutes for every session
        session.run(
            pytest, "-n", "auto", *paths, "-p", "no:cacheprovider", "--durations=25", *session.posargs, external=True
        )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the whole tree."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(venv_backend="none")
def typecheck(session: nox.Session) -> None:
    """mypy on the spec, every backend and the plots, with the frameworks installed so their types count."""
    env = _shared_env(session)  # kept for the tests session (which deletes it in CI)
    dirs = ["spec"] + [f"backends/{b}" for b in BACKENDS] + (["plots"] if HAS_PLOTS else [])
    session.run(str(env / "bin" / "mypy"), *[f"{d}/src" for d in dirs], external=True)


@nox.session
@nox.parametrize("backend", BACKENDS, ids=BACKENDS)
def plots(session: nox.Session, backend: str) -> None:
    """Regenerate every figure with one backend into plots/out/<backend>/ (numpy also into docs/images/)."""
    if not HAS_PLOTS:
        session.log("no plots package is installed yet (tensorglot-plots): nothing to draw")
        return
    session.env.update(SINGLE_THREAD)
    session.install(*CONSTRAINTS, *_packages(backend), "./plots")
    session.run("tensorglot", "plots", "--backend", backend, "--out", f"plots/out/{backend}")
    if backend == "numpy":
        session.run("tensorglot", "plots", "--backend", backend, "--out", "docs/images")


@nox.session
@nox.parametrize("backend", BACKENDS, ids=BACKENDS)
def bench(session: nox.Session, backend: str) -> None:
    """The benchmark table of one backend (ratios against built-ins measured in the same run)."""
    session.install(*CONSTRAINTS, *_packages(backend), "tqdm", "safetensors")
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    session.run("tensorglot", "bench", "--backend", backend, "--json", str(out / f"{backend}.json"), *session.posargs)
