"""Glance's image hashes: multihash (os_hash_algo / os_hash_value) and the legacy md5 checksum.

Computed while an image streams through imagefs, so publishing needs no second read; when bytes
arrive out of order the writer feeds this from its spool or the upload at commit instead.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json

META_ALGO = "os_hash_algo"
META_VALUE = "os_hash_value"
META_CHECKSUM = "checksum"

_ZEROS = bytes(1 << 20)
#: Below this, hashing in another thread costs more than it saves.
_PARALLEL_MIN = 256 << 10
#: md5 of large buffers runs here while the caller's thread does the multihash: hashlib
#: releases the GIL, so the two use two cores (serially they capped uploads near 440 MB/s).
_md5_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="md5")


class ImageHasher:
    """Hashes bytes fed strictly in order; ``offset`` tells where the next byte must come from."""

    def __init__(self, algo: str = "sha512") -> None:
        self.algo = algo
        self._multi = hashlib.new(algo)
        self._md5 = hashlib.md5(usedforsecurity=False)
        self.offset = 0

    def update(self, data: bytes | memoryview) -> None:
        if len(data) >= _PARALLEL_MIN:
            md5 = _md5_pool.submit(self._md5.update, data)
            self._multi.update(data)
            md5.result()
        else:
            self._multi.update(data)
            self._md5.update(data)
        self.offset += len(data)

    def update_zeros(self, count: int) -> None:
        """Account for a hole (never-written range reads as zeros)."""
        while count > 0:
            n = min(count, len(_ZEROS))
            self.update(memoryview(_ZEROS)[:n])
            count -= n

    def meta(self) -> dict[str, str]:
        return {META_ALGO: self.algo, META_VALUE: self._multi.hexdigest(),
                META_CHECKSUM: self._md5.hexdigest()}


ALGOS = ("sha512", "sha384", "sha256", "sha1", "md5")


def parse_hashes(text: str) -> tuple[str | None, dict[str, str]]:
    """Parse what ``imagefs hash`` sets as ``user.imagefs.hashes``: a JSON object with
    ``os_hash_algo``, ``os_hash_value``, ``checksum`` and optionally ``version`` (the image
    version the bytes were read from). All three hashes travel in one value so they are stored
    in one backend call: never an algo from one run beside a value from another.

    Returns (version or None, metadata); raises ValueError naming what is wrong."""
    try:
        doc = json.loads(text)
    except ValueError:
        raise ValueError("expected a JSON object") from None
    if not isinstance(doc, dict) or not all(isinstance(v, str) for v in doc.values()):
        raise ValueError("expected a JSON object of strings")
    unknown = set(doc) - {META_ALGO, META_VALUE, META_CHECKSUM, "version"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}")
    algo, value, md5 = doc.get(META_ALGO), doc.get(META_VALUE), doc.get(META_CHECKSUM)
    if algo not in ALGOS:
        raise ValueError(f"{META_ALGO} must be one of {', '.join(ALGOS)}")
    if not _is_hex(value, hashlib.new(algo).digest_size * 2):
        raise ValueError(f"{META_VALUE} must be the {algo} hex digest")
    if not _is_hex(md5, 32):
        raise ValueError(f"{META_CHECKSUM} must be an md5 hex digest")
    assert value is not None and md5 is not None
    return doc.get("version"), {META_ALGO: algo, META_VALUE: value, META_CHECKSUM: md5}


def _is_hex(s: str | None, length: int) -> bool:
    return s is not None and len(s) == length and all(c in "0123456789abcdef" for c in s)
