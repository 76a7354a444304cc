"""Store tables for the rbd kind: a fresh pool on the harness's first or second Ceph cluster.

The keyring is named by path (the harness's own file), never copied into the table.
"""

from __future__ import annotations

from typing import Any

import pytest

__all__ = ["rbd_store_table", "rbd2_store_table", "rbd_table"]


def rbd_table(info: Any, pool: str, **extra: Any) -> dict[str, Any]:
    """The config table of an rbd store on cluster ``info`` (a CephInfo), pool ``pool``."""
    return {"type": "rbd", "conf": str(info.conf), "pool": pool, "user": str(info.user),
            "keyring": str(info.keyring), **extra}


@pytest.fixture
def rbd_store_table(ceph: Any, rbd_pool: str) -> dict[str, Any]:
    """An rbd store on ``ceph``, in a fresh pool."""
    return rbd_table(ceph, rbd_pool)


@pytest.fixture
def rbd2_store_table(ceph2: Any, rbd_pool2: str) -> dict[str, Any]:
    """An rbd store on the second cluster ``ceph2``, in a fresh pool."""
    return rbd_table(ceph2, rbd_pool2)
