"""S3 naming and encoding: keys, hidden upload keys, part sizes, metadata headers, ETags.

Pure functions and constants, no client: what the other s3 modules agree on about how an
image is laid out in a bucket.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from imagefs.stores.base import HIDDEN_PREFIX, user_meta

MiB = 1 << 20
GiB = 1 << 30
MIN_PART = 5 * MiB  # S3's floor for every part but the last
MAX_PART = 5 * GiB
MAX_PARTS = 10_000
PARTS_PER_TIER = 1_000  # part size doubles after each tier of this many parts
#: Hidden keys of uploads in progress: ``<prefix>.imagefs-up-<owner id>``.
UPLOAD_TAG = HIDDEN_PREFIX + "up-"
BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def error_code(e: Exception) -> tuple[str, int]:
    """(error code, HTTP status) of a botocore ClientError, ("", 0) for anything else."""
    resp = getattr(e, "response", None) or {}
    return (str(resp.get("Error", {}).get("Code", "")),
            int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0))


def etag(value: str | None) -> str:
    return (value or "").strip().strip('"')


def encode_meta(meta: Mapping[str, str]) -> dict[str, str]:
    """``os_hash_value`` → ``os-hash-value``: proxies in front of S3 may drop '_' headers."""
    return {k.replace("_", "-"): str(v) for k, v in user_meta(meta).items()}


def decode_meta(meta: Mapping[str, str]) -> dict[str, str]:
    return {k.lower().replace("-", "_"): v for k, v in meta.items()}


def part_size_for(base: int, number: int) -> int:
    """Size of part ``number`` (1-based): doubling every tier keeps 10,000 parts enough."""
    return min(MAX_PART, base << ((number - 1) // PARTS_PER_TIER))


def base_part_size(part_size: int, size_hint: int | None) -> int:
    """A known size gets parts large enough to fit in 9,000 (slack for growth)."""
    if not size_hint:
        return part_size
    need = -(-size_hint // 9000)
    return min(MAX_PART, max(part_size, -(-need // MiB) * MiB))
