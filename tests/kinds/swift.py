"""Store tables for the swift kinds: OpenStack Swift (tempauth) and RGW's Swift API.

The key goes to a 0600 file under ``tmp_path`` (``key_file``), never into the table itself.
Segments are small (4 MiB) so that ordinary test images become multi-segment SLOs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

__all__ = ["swift_store_table", "rgw_swift_store_table"]

SEGMENT_SIZE = "4MiB"


def _key_file(tmp_path: Path, name: str, key: str) -> str:
    path = tmp_path / name
    path.write_text(key + "\n")
    os.chmod(path, 0o600)
    return str(path)


def swift_table(auth_url: str, user: str, key_file: str, container: str,
                **extra: Any) -> dict[str, Any]:
    return {"type": "swift", "auth_url": auth_url, "auth_version": "1", "user": user,
            "key_file": key_file, "container": container, "segment_size": SEGMENT_SIZE,
            **extra}


@pytest.fixture
def swift_store_table(swift: Any, swift_container: str, tmp_path: Path) -> dict[str, Any]:
    """A swift store on the harness's OpenStack Swift, in a fresh container."""
    return swift_table(swift.auth_url, swift.user, _key_file(tmp_path, "swift.key", swift.key),
                       swift_container)


@pytest.fixture
def rgw_swift_store_table(ceph: Any, rgw_swift_container: str, tmp_path: Path
                          ) -> dict[str, Any]:
    """A swift store on Ceph RGW's Swift API, in a fresh container."""
    return swift_table(str(ceph.rgw_swift_auth_url), str(ceph.rgw_swift_user),
                       _key_file(tmp_path, "rgw-swift.key", str(ceph.rgw_swift_key)),
                       rgw_swift_container)
