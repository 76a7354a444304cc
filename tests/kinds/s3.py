"""Store tables for the s3 kind: a fresh bucket on the harness's RGW.

The secret goes to a 0600 file under ``tmp_path`` (``secret_access_key_file``), never into the
table. Parts are the S3 minimum (5 MiB) so that ordinary test images become multipart uploads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

__all__ = ["s3_store_table", "s3_table"]


def s3_table(ceph: Any, bucket: str, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    """An s3 store table for ``bucket`` on cluster ``ceph``'s RGW."""
    secret = tmp_path / f"s3-{bucket}.secret"
    secret.write_text(str(ceph.s3_secret_key) + "\n")
    os.chmod(secret, 0o600)
    return {"type": "s3", "endpoint_url": ceph.s3_endpoint, "bucket": bucket,
            "region": "us-east-1", "addressing_style": "path",
            "access_key_id": ceph.s3_access_key, "secret_access_key_file": str(secret),
            "part_size": "5MiB", **extra}


@pytest.fixture
def s3_store_table(ceph: Any, s3_bucket: str, tmp_path: Path) -> dict[str, Any]:
    """An s3 store on the harness's RGW, in a fresh bucket."""
    return s3_table(ceph, s3_bucket, tmp_path)
