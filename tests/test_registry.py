"""Discovery, selection precedence, load errors and the ``tensorglot backends`` command."""

from __future__ import annotations

import json
import os

import pytest

import tensorglot
from tensorglot import registry as reg
from tensorglot.cli import main

BROKEN = "raise ImportError('this plugin is broken on purpose')\n"
DUPLICATE = """
from tensorglot.hookspecs import hookimpl

@hookimpl
def tensorglot_register_backends(register):
    register("numpy", lambda: None, capabilities={"grad"})
    register("extra", lambda: None, capabilities={"grad"})
"""
RAISING_HOOK = """
from tensorglot.hookspecs import hookimpl

@hookimpl
def tensorglot_register_backends(register):
    raise RuntimeError("hook exploded")
"""


def test_numpy_is_available_and_the_default():
    assert "numpy" in tensorglot.available_backends()
    assert tensorglot.get_backend().name == "numpy"


def test_precedence_explicit_over_use_over_env(monkeypatch):
    monkeypatch.setenv("TENSORGLOT_BACKEND", "no-such-env-backend")
    # The environment is read at call time: the unknown name shows up only now.
    with pytest.raises(ValueError, match="no-such-env-backend"):
        tensorglot.get_backend()
    with tensorglot.use("numpy"):
        assert tensorglot.get_backend().name == "numpy"  # use() beats the environment
    assert tensorglot.get_backend("numpy").name == "numpy"  # explicit beats everything
    monkeypatch.delenv("TENSORGLOT_BACKEND")
    assert reg.resolve_name() == "numpy"


def test_use_nests_and_restores(monkeypatch):
    monkeypatch.setattr(reg, "_selected", reg._selected)
    with tensorglot.use("numpy"):
        assert reg.resolve_name() == "numpy"
    assert reg.resolve_name() == os.environ.get("TENSORGLOT_BACKEND", "numpy")


def test_unknown_backend_lists_installed_and_says_what_to_install(monkeypatch):
    monkeypatch.setitem(reg.KNOWN_PROVIDERS, "fancy", "tensorglot-fancy")
    with pytest.raises(ValueError) as info:
        tensorglot.get_backend("fancy")
    message = str(info.value)
    assert "installed backends:" in message and "numpy" in message
    assert "pip install tensorglot-fancy" in message
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        tensorglot.use("nope").__enter__()


def test_get_backend_rejects_non_string():
    with pytest.raises(TypeError, match="get_backend: name must be a str"):
        tensorglot.get_backend(3)  # type: ignore[arg-type]


def test_register_plugin_in_process_and_unregister():
    class Plugin:
        @tensorglot.hookspecs.hookimpl
        def tensorglot_register_backends(self, register):
            register("inproc", lambda: tensorglot.get_backend("numpy"), capabilities={"float64"})

    r = reg.registry()
    r.register_plugin(Plugin(), name="test-inproc")
    try:
        assert "inproc" in tensorglot.available_backends()
        assert tensorglot.get_backend("inproc").name == "numpy"
    finally:
        r.unregister_plugin("test-inproc")
    assert "inproc" not in tensorglot.available_backends()


def test_unknown_capability_is_a_load_error():
    class Plugin:
        @tensorglot.hookspecs.hookimpl
        def tensorglot_register_backends(self, register):
            register("capless", lambda: None, capabilities={"teleport"})

    r = reg.registry()
    r.register_plugin(Plugin(), name="test-capless", distribution="tensorglot-capless")
    try:
        errors = [e for e in r.errors if e.plugin == "test-capless"]
        assert errors and "teleport" in errors[0].message
        assert "capless" not in r.infos()
    finally:
        r.unregister_plugin("test-capless")


def test_broken_and_duplicate_plugins_are_reported_and_others_work(fake_distribution, run_python):
    path = fake_distribution(
        "tensorglot-broken",
        {"broken": "tg_broken", "dupe": "tg_dupe", "exploding": "tg_exploding"},
        {"tg_broken": BROKEN, "tg_dupe": DUPLICATE, "tg_exploding": RAISING_HOOK},
    )
    code = (
        "import json, numpy as np, tensorglot\n"
        "from tensorglot.cli_backends import collect\n"
        "data = collect()\n"
        "be = tensorglot.get_backend('numpy')\n"
        "print(json.dumps({'data': data, 'works': float(be.ops.softmax(np.zeros(2))[0]), 'dist': "
        "tensorglot.registry.registry().infos()['numpy'].distribution}))\n"
    )
    result = run_python(code, env={"PYTHONPATH": str(path)})
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    errors = {e["plugin"].split(" = ")[0]: e for e in out["data"]["errors"]}
    assert errors["broken"]["distribution"] == "tensorglot-broken"
    assert "this plugin is broken on purpose" in errors["broken"]["error"]
    # Whatever the load order, tensorglot-numpy owns the name and the impostor is reported.
    assert "'numpy' belongs to the distribution tensorglot-numpy" in errors["dupe"]["error"]
    assert "dupe = tg_dupe (tensorglot-broken)" in errors["dupe"]["error"]
    assert "hook exploded" in errors["exploding"]["error"]
    names = [b["name"] for b in out["data"]["backends"]]
    assert "numpy" in names and "extra" in names  # the duplicate's other backend still registers
    assert out["works"] == 0.5 and out["dist"] == "tensorglot-numpy"

    unknown = run_python("import tensorglot; tensorglot.get_backend('broken')", env={"PYTHONPATH": str(path)})
    assert "this plugin is broken on purpose" in unknown.stderr and "tensorglot-broken" in unknown.stderr

    strict = run_python(code, env={"PYTHONPATH": str(path), "TENSORGLOT_STRICT": "1"})
    assert strict.returncode != 0 and "broken on purpose" in strict.stderr


def test_listing_imports_no_framework(run_python):
    code = (
        "import sys, tensorglot\n"
        "from tensorglot.cli import main\n"
        "names = tensorglot.available_backends()\n"
        "main(['backends', '--json'])\n"
        "heavy = sorted(m for m in ('torch', 'jax', 'jaxlib', 'matplotlib') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout


def test_backends_command_table_and_json(capsys):
    assert main(["backends"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:3] == ["name", "distribution", "version"]
    assert any(line.startswith("numpy ") and "tensorglot-numpy" in line for line in table.splitlines())
    assert main(["backends", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    numpy_row = next(b for b in data["backends"] if b["name"] == "numpy")
    assert numpy_row["framework"] == "numpy" and numpy_row["framework_version"]
    assert "float64" in numpy_row["capabilities"]


def test_cli_reports_errors_cleanly(capsys):
    assert main(["bench", "--backend", "nope"]) == 2
    assert "unknown backend 'nope'" in capsys.readouterr().err


IMPOSTOR = """
from tensorglot.hookspecs import hookimpl

@hookimpl
def tensorglot_register_backends(register):
    register("numpy", lambda: None, capabilities={"grad"})
"""
OWN_NAME = """
from tensorglot.hookspecs import hookimpl

@hookimpl
def tensorglot_register_backends(register):
    register("fancy", lambda: "{dist}")
"""
_WHO = (
    "import json, numpy as np, tensorglot\n"
    "r = tensorglot.registry.registry()\n"
    "print(json.dumps({'dist': r.infos()['numpy'].distribution, 'works': "
    "float(tensorglot.get_backend('numpy').ops.softmax(np.zeros(2))[0]), "
    "'errors': [e.plugin + ' ' + e.message for e in r.errors]}))\n"
)


@pytest.mark.parametrize("dist", ["aaa-impostor", "zzz-impostor"], ids=["sorts-first", "sorts-last"])
def test_an_entry_point_named_numpy_from_another_distribution_cannot_take_the_name(fake_distribution, run_python, dist):
    # An entry point called `numpy` used to own the name by that alone, so whichever loaded first won.
    path = fake_distribution(dist, {"numpy": "tg_impostor"}, {"tg_impostor": IMPOSTOR})
    result = run_python(_WHO, env={"PYTHONPATH": str(path)})
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["dist"] == "tensorglot-numpy" and out["works"] == 0.5
    [error] = [e for e in out["errors"] if "tg_impostor" in e]
    assert f"numpy = tg_impostor ({dist}) may not register it" in error
    assert "belongs to the distribution tensorglot-numpy" in error


def test_two_distributions_with_one_new_name_keep_a_fixed_owner_and_name_both(fake_distribution, run_python):
    # Written in reverse order: the owner is the first distribution by name, not the first on the path.
    path = fake_distribution("zzz-fancy", {"fancy": "tg_fancy_z"}, {"tg_fancy_z": OWN_NAME.format(dist="zzz")})
    fake_distribution("aaa-fancy", {"fancy": "tg_fancy_a"}, {"tg_fancy_a": OWN_NAME.format(dist="aaa")})
    code = (
        "import tensorglot\n"
        "r = tensorglot.registry.registry()\n"
        "print(tensorglot.get_backend('fancy'), r.infos()['fancy'].distribution)\n"
        "print([e.message for e in r.errors if 'fancy' in e.message])\n"
    )
    result = run_python(code, env={"PYTHONPATH": str(path)})
    assert result.returncode == 0, result.stderr
    first, errors = result.stdout.splitlines()
    assert first == "aaa aaa-fancy"
    assert "already registered by fancy = tg_fancy_a (aaa-fancy)" in errors


def test_strict_mode_raises_once_and_leaves_a_working_registry(fake_distribution, run_python):
    path = fake_distribution("tensorglot-broken", {"broken": "tg_broken"}, {"tg_broken": BROKEN})
    code = (
        "import os, numpy as np, tensorglot\n"
        "try:\n"
        "    tensorglot.get_backend('numpy')\n"
        "except RuntimeError as exc:\n"
        "    print('STRICT', exc)\n"
        "os.environ['TENSORGLOT_STRICT'] = '0'\n"
        "be = tensorglot.get_backend('numpy')\n"
        "print('WORKS', float(be.ops.softmax(np.zeros(2))[0]), tensorglot.available_backends())\n"
    )
    result = run_python(code, env={"PYTHONPATH": str(path), "TENSORGLOT_STRICT": "1"})
    assert result.returncode == 0, result.stderr
    strict, works = result.stdout.splitlines()
    assert "broken on purpose" in strict and "tensorglot-broken" in strict
    assert works.startswith("WORKS 0.5") and "'numpy'" in works
