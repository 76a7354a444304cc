"""Block cache: a memory LRU in front of a size-bounded directory of block files.

The cache knows neither stores nor FUSE: keys are tuples that callers make unique (they include
the image version, so a replaced image is never served from stale blocks) and values are bytes.

Memory is bounded by ``memory_size`` (cachetools LRU weighted by length). Disk is bounded by
``disk_size``; each block file carries its key and a CRC32 of its data, so a torn or corrupted
file is detected, removed and treated as a miss, never served.

Disk reads block; callers run them in worker threads. Disk writes go to threads of the
cache's own (``WriteBehind``), fed from the trio thread without a wait. The memory methods are
cheap and are called from the trio thread only.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import struct
import threading
import time
import zlib
from collections import OrderedDict, deque
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
        self._dirs: set[str] = set()  # subdirectories known to exist
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
            if rel[:2] not in self._dirs:
                path.parent.mkdir(exist_ok=True)
                self._dirs.add(rel[:2])
            # Few system calls: each one gives up the GIL and may wait to get it back.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                parts = [header, kb, data]
                while parts:
                    n = os.writev(fd, parts)
                    while parts and n >= len(parts[0]):
                        n -= len(parts[0])
                        parts.pop(0)
                    if parts and n:
                        parts[0] = memoryview(parts[0])[n:]
            finally:
                os.close(fd)
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


class WriteBehind:
    """Threads of the cache's own storing blocks on disk behind the readers, in arrival order.

    Why: a block handed to a trio worker thread per write costs two hops through the event
    loop and a wait for the GIL at each; with six fetch threads busy, a writer fed that way
    stored 141 of the 512 blocks of a cold 512 MiB read (measured here) and the next read
    fetched the rest again. One dedicated thread stored 70-80 %, two stored all (more contend
    for the file system's locks: dozens took five times the system time). ``offer`` never
    waits: a block that finds ``max_bytes`` already queued is not stored, so reads never wait
    on the disk cache and memory stays bounded.
    """

    #: Writer threads.
    threads = 2

    def __init__(self, disk: DiskCache, max_bytes: int) -> None:
        self.disk = disk
        self.max_bytes = max_bytes
        self._queue: deque[tuple[Hashable, bytes]] = deque()
        self._queued = 0
        self._cond = threading.Condition()
        self._closed = False
        self._threads: list[threading.Thread] = []
        #: Blocks not stored because the queue was full, for status and tests.
        self.dropped = 0

    def offer(self, key: Hashable, data: bytes) -> bool:
        with self._cond:
            if self._closed or self._queued + len(data) > self.max_bytes:
                self.dropped += 1
                return False
            self._queue.append((key, data))
            self._queued += len(data)
            if not self._threads:
                for i in range(self.threads):
                    t = threading.Thread(target=self._run, name=f"disk-cache-writer-{i}",
                                         daemon=True)
                    t.start()
                    self._threads.append(t)
            self._cond.notify()
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                key, data = self._queue.popleft()
            try:
                self.disk.put(key, data)
            except Exception as e:  # a block not cached is only a later miss
                log.warning("disk cache: block not stored: %s", e)
            with self._cond:
                self._queued -= len(data)
                self._cond.notify_all()

    def close(self, timeout: float) -> bool:
        """Store what is queued within ``timeout`` seconds (unmount); True if all was."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            threads = list(self._threads)
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in threads)


class BlockCache:
    """Memory first, then disk. ``get_memory`` is for the trio thread; the rest for threads."""

    def __init__(self, memory: MemoryCache, disk: DiskCache | None,
                 write_queue: int = 64 << 20) -> None:
        self.memory = memory
        self.disk = disk
        self._writes = WriteBehind(disk, write_queue) if disk else None

    def get_memory(self, key: Hashable) -> bytes | None:
        return self.memory.get(key)

    def put_memory(self, key: Hashable, data: bytes) -> None:
        self.memory.put(key, data)

    def on_disk(self, key: Hashable) -> bool:
        return self.disk is not None and self.disk.contains(key)

    def get_disk(self, key: Hashable) -> bytes | None:
        return self.disk.get(key) if self.disk else None

    def put_disk_later(self, key: Hashable, data: bytes) -> bool:
        """Queue ``data`` for the disk cache without waiting; False if it will not be stored."""
        return self._writes.offer(key, data) if self._writes else False

    def close(self, timeout: float = 10.0) -> None:
        """Finish the queued disk writes (bounded: what is left is only not cached)."""
        if self._writes and not self._writes.close(timeout):
            log.warning("disk cache: blocks still queued after %gs were not stored", timeout)
