"""The Backend protocol: what every array backend provides.

A backend is four namespaces that mirror the spec modules (`ops`, `encodings`, `layers`, `parallel`)
plus conversion to and from NumPy. A backend built on `ArrayBackend` writes only kernels
(`tensorglot.kernels`) and a small array adapter; its ``ops`` and ``encodings`` are the spec's front ends
bound to it. Capabilities are declared, never discovered by failure: a test
that needs ``grad`` skips on a backend without it, with the capability as the reason.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

#: Every capability name the suite knows. A backend declares a subset.
KNOWN_CAPABILITIES = frozenset(
    {
        "float64",  # computes in float64 (the reference needs it)
        "float16",
        "bfloat16",
        "grad",  # autograd through the public ops
        "jit",
        "flash",  # ops.flash_attention and ops.flash_attention_backward (blockwise attention)
        "multi_device",
        "layers",  # the transformer, KV caches and generate
        "dp",
        "tp",
        "fsdp",
        "pp",
    }
)

DTYPES = ("float64", "float32", "float16", "bfloat16")


@runtime_checkable
class Backend(Protocol):
    """An implementation of the spec for one array library."""

    @property
    def name(self) -> str: ...
    @property
    def capabilities(self) -> frozenset[str]: ...
    @property
    def ops(self) -> Any: ...
    @property
    def encodings(self) -> Any: ...
    @property
    def layers(self) -> Any: ...
    @property
    def parallel(self) -> Any: ...

    def asarray(self, x: Any, /, dtype: str | None = None) -> Any:
        """Convert a NumPy array (or nested list) to this backend's array, optionally casting.

        ``dtype`` is one of ``"float64" "float32" "float16" "bfloat16" "int32" "int64" "bool"``.
        """
        ...

    def to_numpy(self, x: Any, /) -> Any:
        """Return a NumPy array with the same values (bfloat16 is widened to float32)."""
        ...

    def dtype_name(self, x: Any, /) -> str:
        """The dtype of ``x`` as one of the names `asarray` takes."""
        ...


class ArrayBackend:
    """The base of a backend whose public functions are the spec's front ends.

    A subclass sets ``name``, ``capabilities`` and ``kernels`` (a namespace of the functions
    `tensorglot.kernels` describes) and writes the array adapter below: `asarray`, `native`, `to_numpy`,
    `dtype_name`, `astype`, and where the library has them `device` and `is_traced`. ``ops`` and
    ``encodings`` are then `tensorglot.ops.Ops` and `tensorglot.encodings.Encodings` bound to it.
    """

    name: str
    capabilities: frozenset[str]
    kernels: Any

    def __init__(self) -> None:
        from .encodings import Encodings
        from .ops import Ops

        self.ops = Ops(self)
        self.encodings = Encodings(self)

    # -- the array adapter ----------------------------------------------------------------------------

    def asarray(self, x: Any, /, dtype: str | None = None) -> Any:
        raise NotImplementedError

    def native(self, x: Any, /) -> Any:
        """``x`` itself when it is already this library's array, else ``asarray(x)`` (no copy, no cast)."""
        raise NotImplementedError

    def to_numpy(self, x: Any, /) -> Any:
        raise NotImplementedError

    def dtype_name(self, x: Any, /) -> str:
        raise NotImplementedError

    def astype(self, x: Any, dtype: str, /) -> Any:
        """``x`` cast to the dtype named ``dtype`` (x itself when it has it already)."""
        raise NotImplementedError

    def device(self, x: Any, /) -> Any:
        """Where ``x`` lives; arrays of one call must agree. One device unless the library has several."""
        return None

    def is_traced(self, x: Any, /) -> bool:
        """Whether ``x`` is a placeholder of a tracing compiler (JAX), whose values are unknown."""
        return False

    def __repr__(self) -> str:
        return f"<tensorglot backend {self.name!r}>"
