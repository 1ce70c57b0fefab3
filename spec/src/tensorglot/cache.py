"""The KV cache protocol: filled by the layers issue."""

from __future__ import annotations
