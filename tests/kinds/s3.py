"""Store tables for the s3 kind (filled in with the s3 store)."""

from __future__ import annotations

__all__: list[str] = []
