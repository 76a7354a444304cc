"""Store tables for the cinder kind: a fresh project (so, no volumes) on the harness's Cinder.

noauth: the token is USER:PROJECT and any hex project id is a project of its own, so every
test sees only the volumes it made. The data path uses the harness's Ceph conf and keyring by
path, as an operator's table would name them, and ``rbd_pool`` (Cinder's pool), so a
second mount can read an image another mount has attached.
"""

from __future__ import annotations

from typing import Any

import pytest

__all__ = ["cinder_store_table", "cinder_table"]


def cinder_table(project: Any, **extra: Any) -> dict[str, Any]:
    """The config table of a cinder store on project ``project`` (a CinderProject)."""
    info = project.info
    return {"type": "cinder", "auth": "noauth", "endpoint": info.endpoint,
            "user_id": info.user_id, "project_id": project.project_id,
            "ceph_conf": info.ceph_conf, "ceph_user": info.ceph_user,
            "ceph_keyring": info.ceph_keyring, "rbd_pool": info.pool, **extra}


@pytest.fixture
def cinder_store_table(cinder_project: Any) -> dict[str, Any]:
    """A cinder store on a fresh project of ``cinder``."""
    return cinder_table(cinder_project)
