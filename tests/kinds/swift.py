"""Store tables for the swift kind (filled in with the swift store)."""

from __future__ import annotations

__all__: list[str] = []
