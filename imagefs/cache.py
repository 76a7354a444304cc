"""Block cache: a memory LRU in front of a size-bounded directory of block files.

The cache knows neither stores nor FUSE: keys are tuples that callers make unique (they include
the image version, so a replaced image is never served from stale blocks) and values are bytes.

Memory is bounded by ``memory_size`` (cachetools LRU weighted by length). Disk is bounded by
``disk_size``; each block file carries its key and a CRC32 of its data, so a torn or corrupted
file is detected, removed and treated as a miss, never served.

Disk methods block; callers run them in worker threads. The memory methods are cheap and are
called from the trio thread only.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Hashable
from pathlib import Path

from cachetools import LRUCache

log = logging.getLogger(__name__)

_MAGIC = b"IMGFSBK1"
_HEADER = struct.Struct("<8sIIQ")  # magic, crc32(data), len(key), len(data)


class MemoryCache:
    """LRU of blocks bounded by total bytes."""

    def __init__(self, max_bytes: int) -> None:
        self._lru: LRUCache[Hashable, bytes] = LRUCache(maxsize=max_bytes, getsizeof=len)

    def get(self, key: Hashable) -> bytes | None:
        return self._lru.get(key)

    def put(self, key: Hashable, data: bytes) -> None:
        if len(data) <= self._lru.maxsize:
            self._lru[key] = data

    @property
    def used(self) -> int:
        return int(self._lru.currsize)


class DiskCache:
    """Block files under ``root``, evicted least-recently-used beyond ``max_bytes``.

    Thread-safe: the index is guarded by a lock; file I/O happens outside it.
    """

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()
        self._used = 0
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._scan()

    def _scan(self) -> None:
        """Rebuild the index from what a previous run left (oldest access first)."""
        entries = []
        for sub in self.root.iterdir():
            if not sub.is_dir():
                continue
            for f in sub.iterdir():
                if f.name.endswith(".tmp"):
                    f.unlink(missing_ok=True)
                    continue
                try:
                    st = f.stat()
                except FileNotFoundError:
                    continue
                entries.append((st.st_atime, f.relative_to(self.root).as_posix(), st.st_size))
        for _, rel, size in sorted(entries):
            self._index[rel] = size
            self._used += size
        self._evict()

    @staticmethod
    def _keybytes(key: Hashable) -> bytes:
        return repr(key).encode("utf-8", "surrogateescape")

    def _rel(self, kb: bytes) -> str:
        h = hashlib.sha256(kb).hexdigest()
        return f"{h[:2]}/{h}"

    @property
    def used(self) -> int:
        return self._used

    def contains(self, key: Hashable) -> bool:
        """Whether the index lists ``key`` (no I/O: a miss costs no thread hop)."""
        return self.max_bytes > 0 and self._rel(self._keybytes(key)) in self._index

    def get(self, key: Hashable) -> bytes | None:
        if self.max_bytes <= 0:
            return None
        kb = self._keybytes(key)
        rel = self._rel(kb)
        with self._lock:
            if rel not in self._index:
                return None
            self._index.move_to_end(rel)
        try:
            with open(self.root / rel, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            self._forget(rel)
            return None
        except OSError as e:  # a cache that cannot be read is a miss, never a failed read
            log.warning("disk cache: cannot read %s (%s); fetching from the store",
                        self.root / rel, e)
            self._forget(rel)
            return None
        data = self._decode(raw, kb)
        if data is None:
            log.warning("disk cache: corrupt block file %s removed", self.root / rel)
            self._remove(rel)
        return data

    @staticmethod
    def _decode(raw: bytes, kb: bytes) -> bytes | None:
        if len(raw) < _HEADER.size:
            return None
        magic, crc, klen, dlen = _HEADER.unpack_from(raw)
        body = memoryview(raw)[_HEADER.size:]
        if magic != _MAGIC or len(body) != klen + dlen or bytes(body[:klen]) != kb:
            return None
        data = body[klen:]  # a view: no copy of the block
        if zlib.crc32(data) != crc:
            return None
        return data  # type: ignore[return-value]

    def put(self, key: Hashable, data: bytes) -> None:
        if self.max_bytes <= 0 or len(data) > self.max_bytes:
            return
        kb = self._keybytes(key)
        rel = self._rel(kb)
        path = self.root / rel
        tmp = path.with_name(f"{path.name}.{threading.get_ident()}.tmp")
        header = _HEADER.pack(_MAGIC, zlib.crc32(data), len(kb), len(data))
        try:
            path.parent.mkdir(exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(header)
                f.write(kb)
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            log.warning("disk cache: cannot store block (%s); continuing without it", e)
            return
        size = len(header) + len(kb) + len(data)
        with self._lock:
            self._used += size - self._index.pop(rel, 0)
            self._index[rel] = size
        self._evict()

    def _forget(self, rel: str) -> None:
        with self._lock:
            self._used -= self._index.pop(rel, 0)

    def _remove(self, rel: str) -> None:
        self._forget(rel)
        with contextlib.suppress(OSError):
            (self.root / rel).unlink(missing_ok=True)

    def _evict(self) -> None:
        while True:
            with self._lock:
                if self._used <= self.max_bytes or not self._index:
                    return
                rel, size = self._index.popitem(last=False)
                self._used -= size
            with contextlib.suppress(OSError):
                (self.root / rel).unlink(missing_ok=True)


class BlockCache:
    """Memory first, then disk. ``get_memory`` is for the trio thread; the rest for threads."""

    def __init__(self, memory: MemoryCache, disk: DiskCache | None) -> None:
        self.memory = memory
        self.disk = disk

    def get_memory(self, key: Hashable) -> bytes | None:
        return self.memory.get(key)

    def put_memory(self, key: Hashable, data: bytes) -> None:
        self.memory.put(key, data)

    def on_disk(self, key: Hashable) -> bool:
        return self.disk is not None and self.disk.contains(key)

    def get_disk(self, key: Hashable) -> bytes | None:
        return self.disk.get(key) if self.disk else None

    def put_disk(self, key: Hashable, data: bytes) -> None:
        if self.disk:
            self.disk.put(key, data)
