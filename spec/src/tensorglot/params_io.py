"""Save and load a model's params (and its config) without pickle: ``.npz`` or ``.safetensors``.

`tensorglot.params` re-exports `save_params` and `load_params`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from .params import TransformerConfig

# -- save and load (no pickle) ---------------------------------------------------------------------

_CONFIG_KEY = "__config__"


def save_params(
    path: str | os.PathLike[str], params: Mapping[str, Any], /, *, config: TransformerConfig | None = None
) -> None:
    """Write ``params`` (NumPy arrays) to ``.npz`` or ``.safetensors`` (chosen by the suffix).

    The config, when given, is stored as JSON beside them (a string array in ``.npz``, the metadata in
    safetensors). Nothing is pickled: an array that is not bool, int or float (an object array) is a
    TypeError; safetensors needs the ``safetensors`` package.
    """
    path = os.fspath(path)
    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in params.items()}
    for k, v in arrays.items():
        if v.dtype.kind not in "biuf":  # an object or string array would be pickled (npz) or unreadable
            raise TypeError(
                f"save_params: params[{k!r}] has dtype {v.dtype}; wanted a numeric dtype (bool, int, float): "
                "nothing is pickled"
            )
    if _CONFIG_KEY in arrays:
        raise ValueError(f"save_params: {_CONFIG_KEY!r} is reserved for the config, not a parameter name")
    meta = None if config is None else json.dumps(config.to_dict())
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file

        save_file(arrays, path, metadata=None if meta is None else {_CONFIG_KEY: meta})
    elif path.endswith(".npz"):
        payload: dict[str, Any] = dict(arrays)
        if meta is not None:
            payload[_CONFIG_KEY] = np.array(meta)  # a unicode array: loads without pickle
        np.savez(path, **payload)
    else:
        raise ValueError(f"save_params: path must end in .npz or .safetensors, got {path!r}")


def load_params(path: str | os.PathLike[str], /) -> tuple[dict[str, np.ndarray], TransformerConfig | None]:
    """Read what `save_params` wrote: ``(params, config or None)``. ``.npz`` loads with allow_pickle=False."""
    path = os.fspath(path)
    meta: str | None = None
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.numpy import load_file

        params = load_file(path)
        with safe_open(path, framework="numpy") as fh:
            meta = (fh.metadata() or {}).get(_CONFIG_KEY)
    elif path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            params = {k: data[k] for k in data.files if k != _CONFIG_KEY}
            if _CONFIG_KEY in data.files:
                meta = str(data[_CONFIG_KEY])
    else:
        raise ValueError(f"load_params: path must end in .npz or .safetensors, got {path!r}")
    return params, None if meta is None else TransformerConfig.from_dict(json.loads(meta))
