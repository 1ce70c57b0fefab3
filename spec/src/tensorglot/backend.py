"""The Backend protocol: what every array backend provides.

A backend is four namespaces that mirror the spec modules (`ops`, `encodings`, `layers`, `parallel`)
plus conversion to and from NumPy. Capabilities are declared, never discovered by failure: a test
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
