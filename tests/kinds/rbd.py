"""Store tables for the rbd kind (filled in with the rbd store)."""

from __future__ import annotations

__all__: list[str] = []
