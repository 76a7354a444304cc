"""Glance's image hashes: multihash (os_hash_algo / os_hash_value) and the legacy md5 checksum.

Computed while an image streams through imagefs, so publishing needs no second read; when bytes
arrive out of order the writer feeds this from its spool or the upload at commit instead.
"""

from __future__ import annotations

import hashlib

META_ALGO = "os_hash_algo"
META_VALUE = "os_hash_value"
META_CHECKSUM = "checksum"

_ZEROS = bytes(1 << 20)


class ImageHasher:
    """Hashes bytes fed strictly in order; ``offset`` tells where the next byte must come from."""

    def __init__(self, algo: str = "sha512") -> None:
        self.algo = algo
        self._multi = hashlib.new(algo)
        self._md5 = hashlib.md5(usedforsecurity=False)
        self.offset = 0

    def update(self, data: bytes | memoryview) -> None:
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
