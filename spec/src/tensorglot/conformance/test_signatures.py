"""Each backend function has the spec's signature: names, kinds (positional-only / keyword-only), defaults."""

from __future__ import annotations

import inspect

import pytest

from tensorglot import encodings, ops

NAMESPACES = {"ops": ops.Ops, "encodings": encodings.Encodings}
FUNCTIONS = [
    (ns, name) for ns, proto in NAMESPACES.items() for name in __import__(f"tensorglot.{ns}", fromlist=["NAMES"]).NAMES
]
FLASH_FUNCTIONS = [("ops", name) for name in ops.FLASH_NAMES]


def _shape(sig: inspect.Signature, drop_self: bool) -> list[tuple[str, object, object]]:
    params = list(sig.parameters.values())[1 if drop_self else 0 :]
    return [(p.name, p.kind, p.default) for p in params]


@pytest.mark.parametrize(
    "namespace,name",
    [*FUNCTIONS, *(pytest.param(*f, marks=pytest.mark.requires("flash")) for f in FLASH_FUNCTIONS)],
    ids=[f"{n}.{f}" for n, f in (*FUNCTIONS, *FLASH_FUNCTIONS)],
)
def test_signature_matches_spec(backend, namespace, name):
    impl = getattr(getattr(backend, namespace), name, None)
    assert impl is not None, f"backend {backend.name!r} lacks {namespace}.{name}"
    want = _shape(inspect.signature(getattr(NAMESPACES[namespace], name)), drop_self=True)
    got = _shape(inspect.signature(impl), drop_self=False)
    assert got == want, f"{namespace}.{name}: signature {got} differs from the spec's {want}"
