"""Block cache: a memory LRU in front of a size-bounded slab file of block slots.

The cache knows neither stores nor FUSE: keys are tuples that callers make unique (they include
the image version, so a replaced image is never served from stale blocks) and values are bytes.

Memory is bounded by ``memory_size`` (an LRU weighted by length). Disk is bounded by
``disk_size``; each slot carries its key and a checksum of its data, so a torn, stale or corrupted
slot is detected, freed and treated as a miss, never served. ``DiskCache`` says why slots and
not one file per block.

Disk reads block; callers run them in worker threads. Disk writes go to threads of the
cache's own (``WriteBehind``), fed from the trio thread without a wait. The memory methods are
cheap and are called from the trio thread only.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import struct
import threading
import time
import weakref
import zlib
from collections import OrderedDict, deque
from collections.abc import Hashable, Iterator
from pathlib import Path

import xxhash

log = logging.getLogger(__name__)

_PAGE = 4096
_SUPER_MAGIC = b"IMGFSSL2"  # 1: data checksums were CRC32
_SUPER = struct.Struct("<8sQ16sI")  # magic, data capacity of a slot, slab id, crc32
_SLOT_MAGIC = b"IMGFSSB2"
# magic, slab id, put sequence, len(key), len(data), _data_sum(key, data), crc32(header + key)
_SLOT = struct.Struct("<8s16sQIIQI")
_KEY_MAX = _PAGE - _SLOT.size  # header and key share a slot's first page; data follows it


def _data_sum(kb: bytes, data: bytes | memoryview) -> int:
    """The checksum of a slot's data, bound to its key.

    Why XXH3 and not CRC32 (the first layout's): every block stored and every block read back
    is summed whole, beside the read path of every cold and warm read, on the cores the reads
    need. zlib.crc32 sums 2.4 GB/s here (0.42 ms of CPU per 1 MiB block), XXH3-64 45 GB/s;
    the switch moved 256 MiB warm re-reads from 715-772 to 849-850 MB/s and cold RBD reads
    from 627 to 761 (medians of 3 alternating mounts). It detects torn, stale and corrupt
    slots as well; neither is meant to resist forgery (the cache directory is root's, 0700).
    """
    return xxhash.xxh3_64_intdigest(data, seed=zlib.crc32(kb))


class MemoryCache:
    """LRU of blocks bounded by total bytes, that can be told a block is done with.

    Why not a plain LRU (cachetools' before): a sequential reader's prefetched blocks wait
    here until it reaches them, and the blocks it has just read were used more recently than
    those, so a plain LRU evicts the unread ones first once the window ahead fills memory;
    they are then read back from the disk cache or fetched again (a cold 512 MiB S3 read at
    the shipped 64 MiB: 51-160 blocks read back from disk, 0-24 with ``demote``). ``demote``
    puts a block its reader has finished with first in line for eviction.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._blocks: OrderedDict[Hashable, bytes] = OrderedDict()  # least recent first
        self._used = 0

    def get(self, key: Hashable) -> bytes | None:
        data = self._blocks.get(key)
        if data is not None:
            self._blocks.move_to_end(key)
        return data

    def put(self, key: Hashable, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        old = self._blocks.pop(key, None)
        if old is not None:
            self._used -= len(old)
        while self._blocks and self._used + len(data) > self.max_bytes:
            self._used -= len(self._blocks.popitem(last=False)[1])
        self._blocks[key] = data
        self._used += len(data)

    def demote(self, key: Hashable) -> None:
        """Make ``key`` the next block evicted (its sequential reader has passed it)."""
        if key in self._blocks:
            self._blocks.move_to_end(key, last=False)

    @property
    def used(self) -> int:
        return self._used


class DiskCache:
    """Blocks in fixed-size slots of one slab file under ``root``, LRU beyond ``max_bytes``.

    Why a slab: with one file per block (create a .tmp, write, rename; unlink to evict), the two
    write-behind threads cost about one of this machine's two cores during a cold sequential
    read (py-spy: os.open alone was 67 of 172 samples in the writers), and cold reads ran at
    220-273 MB/s with the disk cache on against 360-481 MB/s with it off. A slot costs one
    ``pwritev`` to store and one ``pread`` to read; evicting is reusing its slot. Measured by
    tests/bench/bench_disk_cache.py (CPU seconds per GiB, user + sys, median of 6 runs): stored
    1.41 -> 0.65, stored into a full cache (each put evicts) 1.12 -> 0.41, read back 0.35 both.

    Layout: a superblock page (block capacity, a random slab id), then slots of one page of
    header and key, then up to the capacity of data. The capacity is ``block_size`` if given,
    else the first block's size rounded up to a power of two; a larger block starts the slab
    afresh (blocks are at most ``cache.block_size``, so at most once per mount), unless
    ``block_size`` was given, then it is not stored. Every get checks the slot's magic, slab
    id, key, put sequence and a checksum of key and data (``_data_sum``): a torn, stale or
    corrupt slot, or one reassigned to another key while it was being read, is a miss (and
    freed), never served.
    A restart reads the slot headers back (slots are only trusted under the superblock's slab
    id, so bytes of an older layout never pass for a header). The file never grows beyond
    ``max_bytes``; block files of the old one-file-per-block layout are removed.

    Thread-safe: the index is guarded by a lock that no I/O happens under.
    """

    def __init__(self, root: Path, max_bytes: int, block_size: int | None = None) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._fixed = block_size
        self._lock = threading.Lock()
        self._grow_lock = threading.Lock()  # serialises slab resets (held across their I/O)
        self._index: OrderedDict[bytes, tuple[int, int, int]] = OrderedDict()  # slot, len, seq
        self._free: list[int] = []
        self._inflight: set[bytes] = set()
        self._next = self._nslots = self._cap = self._gen = self._seq = 0
        self._slab_id = b""
        self._warned: set[str] = set()
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._remove_old_layout()
        self._fd = os.open(root / "slab", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        weakref.finalize(self, os.close, self._fd)
        try:
            self._open()
        except OSError as e:
            self._warn("read", "disk cache: cannot read %s (%s); starting empty",
                       root / "slab", e)
            self._reset(block_size or 0)

    def _remove_old_layout(self) -> None:
        """Block files of the one-file-per-block layout (``ab/abcd…``) would hold disk beyond
        ``max_bytes`` that nothing counts: remove them."""
        for sub in self.root.iterdir():
            if len(sub.name) == 2 and all(c in "0123456789abcdef" for c in sub.name):
                if sub.is_dir() and not sub.is_symlink():
                    shutil.rmtree(sub, ignore_errors=True)

    def _geometry(self, cap: int) -> None:
        self._cap = cap
        self._nslots = max(0, (self.max_bytes - _PAGE) // (_PAGE + cap)) if cap else 0

    def _open(self) -> None:
        """Take over the slab a previous run left, if it is intact and of the right capacity."""
        raw = os.pread(self._fd, _PAGE, 0)
        cap = 0
        if len(raw) >= _SUPER.size:
            magic, cap, slab_id, crc = _SUPER.unpack_from(raw)
            if magic != _SUPER_MAGIC or crc != zlib.crc32(raw[:_SUPER.size - 4]) or not cap:
                cap = 0
        if not cap or (self._fixed and cap != self._fixed) or self.max_bytes <= 0:
            self._reset(self._fixed or 0)
            return
        self._slab_id = slab_id
        self._geometry(cap)
        slot = _PAGE + cap
        end = _PAGE + self._nslots * slot
        size = os.fstat(self._fd).st_size
        if size > end:  # max_bytes was lowered
            os.ftruncate(self._fd, end)
        found: dict[bytes, tuple[int, int, int]] = {}
        covered = max(0, min(self._nslots, -(-(size - _PAGE) // slot)))
        for i in range(covered):
            head = os.pread(self._fd, _PAGE, _PAGE + i * slot)
            parsed = self._header(head, cap)
            if parsed is None:
                self._free.append(i)
                continue
            kb, seq, n = parsed
            old = found.get(kb)
            if old is not None:  # a stale copy of a block stored again: keep the newer
                self._free.append(old[0] if old[2] < seq else i)
                if old[2] > seq:
                    continue
            found[kb] = (i, n, seq)
        for kb, e in sorted(found.items(), key=lambda kv: kv[1][2]):  # oldest put first
            self._index[kb] = e
        self._seq = max((e[2] for e in found.values()), default=0) + 1
        self._next = covered

    def _reset(self, cap: int) -> None:
        """Start an empty slab of capacity ``cap`` (0: chosen at the first put)."""
        with self._lock:
            self._gen += 1
            self._index.clear()
            self._free.clear()
            self._next = self._nslots = 0  # no slot is handed out until the file is ready
            self._slab_id = os.urandom(16)
            slab_id = self._slab_id
        os.ftruncate(self._fd, 0)
        if cap:
            sb = _SUPER.pack(_SUPER_MAGIC, cap, slab_id, 0)[:-4]
            os.pwrite(self._fd, sb + struct.pack("<I", zlib.crc32(sb)), 0)
        with self._lock:
            self._geometry(cap)

    def _header(self, head: bytes, cap: int, slab_id: bytes | None = None
                ) -> tuple[bytes, int, int] | None:
        """(key, seq, data length) of a slot header page, or None if it is not a valid one."""
        if len(head) < _PAGE:
            return None
        magic, sid, seq, klen, n, _crc, hcrc = _SLOT.unpack_from(head)
        if (magic != _SLOT_MAGIC or sid != (slab_id or self._slab_id) or klen > _KEY_MAX
                or n > cap):
            return None
        kb = head[_SLOT.size:_SLOT.size + klen]
        if zlib.crc32(kb, zlib.crc32(head[:_SLOT.size - 4])) != hcrc:
            return None
        return kb, seq, n

    @staticmethod
    def _keybytes(key: Hashable) -> bytes:
        return repr(key).encode("utf-8", "surrogateescape")

    @property
    def used(self) -> int:
        """Bytes of slots holding blocks (the slab file is never larger than ``max_bytes``)."""
        return len(self._index) * (_PAGE + self._cap) if self._cap else 0

    def contains(self, key: Hashable) -> bool:
        """Whether the index lists ``key`` (no I/O: a miss costs no thread hop)."""
        return self.max_bytes > 0 and self._keybytes(key) in self._index

    def get(self, key: Hashable) -> bytes | None:
        return next(self.get_run([key]))

    def get_run(self, keys: list[Hashable]) -> Iterator[bytes | None]:
        """The blocks of ``keys``, read one after the other in this order (None for each
        miss): a sequential reader's blocks come back in the order it needs them."""
        if self.max_bytes <= 0:
            yield from (None for _ in keys)
            return
        for key in keys:
            kb = self._keybytes(key)
            with self._lock:
                e = self._index.get(kb)
                if e is None:
                    yield None
                    continue
                self._index.move_to_end(kb)
                gen, cap, slab_id = self._gen, self._cap, self._slab_id
            yield self._read_slot(kb, e, gen, cap, slab_id)

    def _read_slot(self, kb: bytes, e: tuple[int, int, int], gen: int, cap: int,
                   slab_id: bytes) -> bytes | None:
        """The data of slot ``e``, or None if that is not the block the index lists there."""
        slot, n, seq = e
        try:
            raw = os.pread(self._fd, _PAGE + n, _PAGE + slot * (_PAGE + cap))
        except OSError as err:  # a cache that cannot be read is a miss, never a failed read
            self._drop(kb, e, gen)
            self._warn("read", "disk cache: cannot read %s (%s); fetching from the store",
                       self.root / "slab", err)
            return None
        data = memoryview(raw)[_PAGE:]  # a view: no copy of the block
        if (self._header(raw[:_PAGE], cap, slab_id) != (kb, seq, n) or len(data) != n
                or _data_sum(kb, data) != _SLOT.unpack_from(raw)[5]):
            # Still listed under the same put: really corrupt. Otherwise the slot was reused
            # for another block while it was read, and this one is simply gone.
            if self._drop(kb, e, gen):
                log.warning("disk cache: corrupt block in slot %d of %s dropped",
                            slot, self.root / "slab")
            return None
        self._warned.discard("read")
        return data  # type: ignore[return-value]

    def _drop(self, kb: bytes, e: tuple[int, int, int], gen: int) -> bool:
        with self._lock:
            if gen != self._gen or self._index.get(kb) != e:
                return False
            del self._index[kb]
            self._free.append(e[0])
            return True

    def put(self, key: Hashable, data: bytes) -> None:
        n = len(data)
        kb = self._keybytes(key)
        if self.max_bytes <= 0 or n > self.max_bytes or len(kb) > _KEY_MAX:
            return
        if n > self._cap and not self._grow(n):
            return
        with self._lock:
            if kb in self._index or kb in self._inflight:
                return
            if self._free:
                slot = self._free.pop()
            elif self._next < self._nslots:
                slot, self._next = self._next, self._next + 1
            elif self._index:
                slot = self._index.popitem(last=False)[1][0]  # evict: reuse its slot
            else:
                return
            self._inflight.add(kb)
            gen, cap, slab_id, seq = self._gen, self._cap, self._slab_id, self._seq
            self._seq += 1
        stored = False
        if n <= cap:  # (always, unless the slab was started afresh meanwhile)
            head = bytearray(_PAGE)
            _SLOT.pack_into(head, 0, _SLOT_MAGIC, slab_id, seq, len(kb), n,
                            _data_sum(kb, data), 0)
            head[_SLOT.size:_SLOT.size + len(kb)] = kb
            struct.pack_into("<I", head, _SLOT.size - 4,
                             zlib.crc32(kb, zlib.crc32(head[:_SLOT.size - 4])))
            try:
                if os.pwritev(self._fd, [head, data], _PAGE + slot * (_PAGE + cap)) != _PAGE + n:
                    raise OSError(errno.ENOSPC, "short write")
                stored = True
            except OSError as err:
                self._warn("write", "disk cache: cannot store block (%s); continuing "
                           "without it", err)
        with self._lock:
            self._inflight.discard(kb)
            if gen != self._gen:
                return
            if stored:
                self._index[kb] = (slot, n, seq)
            else:
                self._free.append(slot)
        if stored:
            self._warned.discard("write")

    def _grow(self, n: int) -> bool:
        """Make room for blocks of ``n`` bytes: a new, empty slab of larger slots."""
        cap = 1 << (n - 1).bit_length()
        if self._fixed or 2 * _PAGE + cap > self.max_bytes:
            return False
        with self._grow_lock:
            if n <= self._cap:
                return True
            if self._cap:
                log.info("disk cache: a %d-byte block: slots grow from %d to %d bytes, "
                         "cached blocks dropped", n, self._cap, cap)
            try:
                self._reset(cap)
            except OSError as e:
                self._warn("write", "disk cache: cannot reset %s (%s)", self.root / "slab", e)
                return False
        return True

    def _warn(self, kind: str, msg: str, *args: object) -> None:
        """One warning until the next success of this kind: a full disk does not flood."""
        if kind in self._warned:
            log.debug(msg, *args)
        else:
            self._warned.add(kind)
            log.warning(msg, *args)


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
            with self._cond:  # nobody waits for the queue to shrink: no notify
                self._queued -= len(data)

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

    def demote_memory(self, key: Hashable) -> None:
        self.memory.demote(key)

    def on_disk(self, key: Hashable) -> bool:
        return self.disk is not None and self.disk.contains(key)

    def get_disk_run(self, keys: list[Hashable]) -> Iterator[bytes | None]:
        """``DiskCache.get_run``: the blocks of ``keys`` in order, None for each miss."""
        if self.disk is None:
            return iter([None] * len(keys))
        return self.disk.get_run(keys)

    def put_disk_later(self, key: Hashable, data: bytes) -> bool:
        """Queue ``data`` for the disk cache without waiting; False if it will not be stored."""
        return self._writes.offer(key, data) if self._writes else False

    def close(self, timeout: float = 10.0) -> None:
        """Finish the queued disk writes (bounded: what is left is only not cached)."""
        if self._writes and not self._writes.close(timeout):
            log.warning("disk cache: blocks still queued after %gs were not stored", timeout)
