"""The layers namespace (the transformer, its config and parameters): see docs/architecture.md.

Filled by the layers issue; this module names the namespace so every backend mirrors it.
"""

from __future__ import annotations

NAMES: tuple[str, ...] = ()
