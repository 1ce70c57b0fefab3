"""`tensorglot.kernels.namespace`, array-api-compat's `array_namespace` memoised by type: it must give the
library's own answer for every array a kernel meets, a traced JAX array and JAX's float0 included."""

from __future__ import annotations

import numpy as np
import pytest
from array_api_compat import array_namespace

from tensorglot.kernels import namespace


def _arrays() -> list:
    import array_api_strict

    arrays = [np.zeros(3, np.float32), np.zeros((), np.int64), array_api_strict.asarray([1.0])]
    try:
        import torch

        arrays += [torch.zeros(2), torch.nn.Parameter(torch.zeros(2))]
    except ImportError:
        pass
    return arrays


@pytest.mark.parametrize("x", _arrays(), ids=lambda x: f"{type(x).__module__}.{type(x).__name__}")
def test_namespace_is_array_namespaces_answer_first_and_memoised(x):
    want = array_namespace(x)
    assert namespace(x) is want
    assert namespace(x) is want  # the second call answers from the memo


def test_a_traced_jax_array_and_a_float0_one_get_jaxs_namespace():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    seen = []
    jax.jit(lambda x: seen.append(namespace(x)) or x)(jnp.zeros(2))
    assert seen == [array_namespace(jnp.zeros(2))]
    namespace(np.zeros(2))  # NumPy's ndarray is memoised ...
    zero = np.zeros(2, dtype=jax.dtypes.float0)  # ... but JAX's zero cotangent, an ndarray too, is JAX's
    assert array_namespace(zero) is not array_namespace(np.zeros(2))
    assert namespace(zero) is array_namespace(zero)


@pytest.mark.parametrize("bad", [1.0, None, [1, 2]], ids=["scalar", "None", "list"])
def test_a_non_array_raises_array_namespaces_error_and_is_not_memoised(bad):
    with pytest.raises(TypeError, match="array"):
        namespace(bad)
    with pytest.raises(TypeError, match="array"):
        namespace(bad)  # a failed lookup left nothing behind to answer from
