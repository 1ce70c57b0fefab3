"""The layers and cache conformance tests catch real mistakes: fake backends, each the NumPy reference
with one classic transformer bug edited into a copy of one function of the spec's layers, must fail them
(and the reference must pass the same selection)."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

FAKES = """
import inspect, textwrap
from tensorglot.hookspecs import hookimpl
from tensorglot.registry import registry
import tensorglot.layers, tensorglot.training
from tensorglot_numpy.backend import NumpyBackend

# (module, function, the line as written, the bug): each fake edits one function of the spec.
BUGS = {
    # a cached step rotates its new tokens as if they sat at positions 0 .. S-1
    "bad-cache-positions": (
        tensorglot.layers, "Layers._cache_positions",
        "pos = p.cache.lengths()[:, None] + np.arange(S)", "pos = np.arange(S) + 0 * p.cache.lengths()[:, None]",
    ),
    # the tied embedding's gradient forgets its use as the output head
    "bad-tied-grad": (tensorglot.training, "value_and_grad", "dembed = dembed + dhead.T", "pass"),
    # attention sees the future
    "bad-causal": (
        tensorglot.layers, "Layers._attention",
        "causal, mask, k_all, v_all = True,", "causal, mask, k_all, v_all = False,",
    ),
}


def edited(module, qualname, old, new):
    owner, _, name = qualname.rpartition(".")
    original = getattr(getattr(module, owner), name) if owner else getattr(module, name)
    source = textwrap.dedent(inspect.getsource(original))
    assert source.count(old) == 1, old
    namespace = dict(vars(module))
    code = "from __future__ import annotations\\n" + source.replace(old, new)  # the module's annotations stay text
    exec(compile(code, f"fake {qualname}", "exec"), namespace)
    return namespace[name]


def make(name):
    module, qualname, old, new = BUGS[name]
    fake = edited(module, qualname, old, new)
    if module is tensorglot.training:
        methods = {"value_and_grad": lambda self, *args: fake(self, *args)}
    else:
        methods = {qualname.rpartition(".")[2]: fake}
    backend = NumpyBackend()
    backend.name = name
    backend.layers = type("FakeLayers", (tensorglot.layers.Layers,), methods)(backend)
    return backend


class Fakes:
    @hookimpl
    def tensorglot_register_backends(self, register):
        for name in BUGS:
            register(name, lambda name=name: make(name), capabilities={"float64", "layers"})


registry().register_plugin(Fakes(), name="layer-fakes", distribution="tests")
"""


@pytest.fixture
def run_suite(pytester):
    pytester.makepyfile(layer_fakes=FAKES)
    pytester.syspathinsert()

    def run(backend: str, selection: str):
        return pytester.runpytest_subprocess(
            "-p", "layer_fakes", "--pyargs", "tensorglot.conformance.test_layers", "tensorglot.conformance.test_cache",
            "--backend", backend, "-k", selection, "-p", "no:cacheprovider", "-q", timeout=300,
        )  # fmt: skip

    return run


def _failed(result) -> set[str]:
    return {line.split()[1].split("::")[-1] for line in result.outlines if line.startswith("FAILED ")}


def test_cached_step_at_the_wrong_positions_fails(run_suite):
    result = run_suite("bad-cache-positions", "cache or generate")
    failed = _failed(result)
    assert any(f.startswith("test_cached_decoding_equals_recomputation") for f in failed), failed
    assert any(f.startswith("test_generate_with_a_cache_gives_the_tokens_of_recomputation") for f in failed), failed
    assert any(f.startswith("test_sequences_of_different_lengths_in_one_batch") for f in failed), failed
    assert not any(f.startswith("test_logits_match_the_reference") for f in failed), failed


def test_tied_embedding_gradient_missing_a_use_fails(run_suite):
    result = run_suite("bad-tied-grad", "gradient")
    failed = _failed(result)
    assert "test_gradient_matches_central_differences[mha-gelu-tied]" in failed, failed
    assert "test_loss_and_gradients_match_the_reference[mha-gelu-tied-float64]" in failed, failed
    assert not any("gqa-swiglu" in f for f in failed), failed  # untied models are right


def test_attention_that_sees_the_future_fails(run_suite):
    result = run_suite("bad-causal", "later_tokens or reference")
    failed = _failed(result)
    assert any(f.startswith("test_output_at_t_ignores_later_tokens") for f in failed), failed
    assert any(f.startswith("test_logits_match_the_reference") for f in failed), failed


def test_the_reference_passes_the_same_selections(run_suite):
    result = run_suite("numpy", "cached_decoding or central_differences or later_tokens")
    assert result.ret == 0, "\n".join(result.outlines[-20:])
