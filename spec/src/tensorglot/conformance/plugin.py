"""The pytest plugin behind ``pytest --pyargs tensorglot.conformance --backend NAME``.

Registered through the ``pytest11`` entry point, so ``--backend`` exists wherever tensorglot is
installed; the fixtures and the xfails list only touch tests inside this package.
"""

from __future__ import annotations

import fnmatch
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

SUITE_PACKAGE = "tensorglot/conformance/"


class ConformanceXfailWarning(UserWarning):
    """An entry in a conformance-xfails file matched no test."""


@dataclass
class XfailEntry:
    pattern: str
    reason: str
    line: int
    used: bool = False

    @property
    def glob(self) -> str:
        """Only ``*`` and ``?`` are wildcards: the brackets of parametrised ids are literal."""
        return self.pattern.replace("[", "[[]")


def parse_xfails(text: str, source: str) -> list[XfailEntry]:
    """One entry a line: a test id (``*`` and ``?`` as wildcards, relative to the suite, e.g.
    ``test_ops.py::test_forward_matches_reference[float16-attention-*]``), then ``#`` and the reason."""
    entries = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pattern, sep, reason = line.partition("#")
        if not sep or not reason.strip():
            raise pytest.UsageError(f"{source}:{number}: an xfail entry needs a reason after '#': {line!r}")
        entries.append(XfailEntry(pattern.strip(), reason.strip(), number))
    return entries


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tensorglot", "tensorglot conformance suite")
    group.addoption(
        "--backend",
        default=None,
        help="the backend the conformance suite checks (default: TENSORGLOT_BACKEND, else numpy)",
    )
    group.addoption(
        "--xfails",
        default=None,
        help="a conformance-xfails.txt listing the tests the backend knowingly fails, one glob and reason a line",
    )


#: The most devices a test of the suite asks for (`test_parallel.WORLD_SIZES`).
HOST_DEVICES = 4


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "requires(capability): skip unless the backend declares the capability")
    if _runs_suite(config):
        # Before any test imports the framework: a backend that simulates devices on this host (JAX's
        # plugin sets XLA_FLAGS) prepares them now, so the suite needs no environment variable.
        from tensorglot.parallel import request_host_devices

        request_host_devices(_backend_name(config), HOST_DEVICES)
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:  # the suite's extra is not installed: its tests will say so when collected
        return
    suppress = [HealthCheck.too_slow, HealthCheck.differing_executors]
    settings.register_profile(
        "tensorglot-ci",
        derandomize=True,
        max_examples=25,
        print_blob=True,
        deadline=None,
        suppress_health_check=suppress,
    )
    settings.register_profile("tensorglot-dev", max_examples=50, deadline=None, suppress_health_check=suppress)
    if not config.getoption("hypothesis_profile", None):
        settings.load_profile("tensorglot-ci" if os.environ.get("CI") else "tensorglot-dev")


def _backend_name(config: pytest.Config) -> str:
    return config.getoption("--backend") or os.environ.get("TENSORGLOT_BACKEND") or "numpy"


def _in_suite(item: pytest.Item) -> bool:
    return SUITE_PACKAGE in str(item.path).replace(os.sep, "/")


def _runs_suite(config: pytest.Config) -> bool:
    return any(SUITE_PACKAGE.rstrip("/") in str(a).replace(".", "/") for a in config.args)


def _lacks(backend: Any, capability: str) -> str:
    """The skip reason for a missing capability, with the backend's hint on how to get it, if it has one."""
    hint = getattr(backend, "capability_hints", {}).get(capability)
    return f"backend {backend.name!r} lacks capability {capability!r}" + (f" ({hint})" if hint else "")


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    if not _runs_suite(config):
        return None
    import tensorglot
    from tensorglot.registry import registry

    name = _backend_name(config)
    info = registry().infos().get(name)
    if info is None:
        return [f"tensorglot {tensorglot.__version__}: backend {name!r} is not installed"]
    return [
        f"tensorglot {tensorglot.__version__}; backend {name} from {info.distribution} {info.version}; "
        f"{info.framework} {info.framework_version()}",
        f"capabilities: {', '.join(sorted(info.capabilities)) or '(none)'}",
    ]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    path = config.getoption("--xfails")
    if not path:
        return
    source = Path(path)
    if not source.exists():
        raise pytest.UsageError(f"--xfails: no such file {path}")
    entries = parse_xfails(source.read_text(), str(source))
    for item in items:
        if not _in_suite(item):
            continue
        test_id = item.nodeid.split("conformance/")[-1]
        for entry in entries:
            if fnmatch.fnmatchcase(test_id, entry.glob):
                entry.used = True
                item.add_marker(pytest.mark.xfail(reason=f"{source.name}:{entry.line}: {entry.reason}", strict=False))
                break
    for entry in entries:
        if not entry.used:
            warnings.warn(
                ConformanceXfailWarning(f"{source}:{entry.line}: entry {entry.pattern!r} matches no test"),
                stacklevel=1,
            )


def pytest_runtest_setup(item: pytest.Item) -> None:
    marks = list(item.iter_markers("requires"))
    if not marks:
        return
    backend = _backend(item.config)
    for mark in marks:
        for cap in mark.args:
            if cap not in backend.capabilities:
                pytest.skip(_lacks(backend, cap))


_BACKENDS: dict[str, Any] = {}


def _backend(config: pytest.Config) -> Any:
    import tensorglot

    name = _backend_name(config)
    if name not in _BACKENDS:
        _BACKENDS[name] = tensorglot.get_backend(name)
    return _BACKENDS[name]


@pytest.fixture(scope="session")
def backend(request: pytest.FixtureRequest) -> Any:
    """The backend under test (``--backend``)."""
    return _backend(request.config)


@pytest.fixture(scope="session")
def reference() -> Any:
    """The NumPy reference backend."""
    import tensorglot

    return tensorglot.get_backend("numpy")


@pytest.fixture(scope="session")
def harness(backend: Any, reference: Any) -> Any:
    from ._harness import Harness

    return Harness(backend, reference)


@pytest.fixture(params=["float64", "float32", "float16", "bfloat16"])
def dtype(request: pytest.FixtureRequest, backend: Any) -> str:
    """Each dtype the spec knows; skipped with the capability as reason where the backend lacks it."""
    from ._harness import DTYPE_CAPABILITY

    cap = DTYPE_CAPABILITY.get(request.param)
    if cap is not None and cap not in backend.capabilities:
        pytest.skip(_lacks(backend, cap))
    return str(request.param)
