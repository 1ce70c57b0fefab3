"""`RopeScaling`: the immutable ``rope_scaling`` mapping a frozen `TransformerConfig` holds."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any


class RopeScaling(Mapping[str, Any]):
    """An immutable, hashable ``rope_scaling`` mapping: a frozen config cannot change under a jit key.

    `TransformerConfig` turns the dict it is given into one (its items sorted); it reads like the dict,
    equals it, pickles, and ``dict(scaling)`` gives the dict back (`TransformerConfig.to_dict` does).
    """

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Any]) -> None:
        self._items = tuple(sorted(dict(items).items()))
        try:
            hash(self._items)
        except TypeError:
            wanted = "numbers or strings"
            raise TypeError(f"TransformerConfig: rope_scaling values must be {wanted}, got {dict(items)}") from None

    def __getitem__(self, key: str) -> Any:
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other)

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        return RopeScaling, (dict(self._items),)

    def __repr__(self) -> str:
        return f"RopeScaling({dict(self._items)!r})"
