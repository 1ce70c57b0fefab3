"""tensorglot: the building blocks of a modern LLM as one spec, implemented by pluggable backends.

>>> import tensorglot
>>> be = tensorglot.get_backend("numpy")
>>> be.name
'numpy'
"""

from __future__ import annotations

from . import checks as checks  # light (numpy only); importing it here lets type checkers see it
from .backend import Backend as Backend
from .params import TransformerConfig as TransformerConfig
from .params import init_params as init_params
from .registry import available_backends as available_backends
from .registry import get_backend as get_backend
from .registry import use as use

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "TransformerConfig",
    "__version__",
    "available_backends",
    "get_backend",
    "init_params",
    "use",
]
