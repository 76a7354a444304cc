"""Store tables for the local kinds: file (a fresh directory) and http (the harness's nginx)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

__all__ = ["file_store_table", "http_store_table", "local_store_table"]


@pytest.fixture
def file_store_table(tmp_path: Path) -> dict[str, Any]:
    d = tmp_path / "file-store"
    d.mkdir()
    return {"type": "file", "path": str(d)}


@pytest.fixture
def local_store_table(tmp_path: Path) -> dict[str, Any]:
    """A second, separate file store: the local side of copies in the common tests."""
    d = tmp_path / "local-store"
    d.mkdir()
    return {"type": "file", "path": str(d)}


@pytest.fixture
def http_store_table(nginx: Any, tmp_path: Path) -> dict[str, Any]:
    """An http store on a fresh directory under the nginx root."""
    sub = nginx.root / tmp_path.name
    sub.mkdir()
    return {"type": "http", "url": f"{nginx.url}{tmp_path.name}/"}
