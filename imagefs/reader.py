"""Open-for-read state: block math, cache lookups, de-duplicated fetches and prefetch.

A ``Reader`` is pinned to the ``ImageInfo`` seen at open: every block key includes its version
and every backend read asks for that version, so a reader never mixes two images (the store
raises ``Changed`` instead, which becomes EIO).

Blocks are the unit of caching; a *run* of consecutive missing blocks is the unit of fetching:
one backend request (``Store.read_chunks``) whose blocks are handed to their readers one by
one as they arrive. Per-request cost dominates small requests (1 MiB ranged GETs reach a third
of what 16 MiB ones do on RGW), so sequential readers prefetch in runs of up to
``fetch_size``, keeping a window ahead of them that starts at two blocks once two blocks were
read in order and doubles with each sequential read after that, up to ``readahead``. Reads
arriving slightly out of order (the kernel's read-ahead has several requests in flight) still
count as sequential; a real seek resets it.

Memory stays bounded: fetched blocks live in the size-bounded memory LRU; prefetched blocks in
flight take one token each from a mount-wide budget of ``cache.max_prefetch_memory`` and a
prefetch that finds none is skipped, not queued; demand fetches are bounded by the kernel's
requests in flight and the stores' thread limits.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass, field

import trio

from imagefs import bridge, stats
from imagefs.cache import BlockCache
from imagefs.stores.base import BackendError, ImageInfo, Store, StoreError

log = logging.getLogger(__name__)

#: Threads reading the disk cache at once: enough to keep a disk busy, few enough not to
#: contend in the kernel.
DISK_READERS = 4
#: The share of the memory cache one reader's prefetch window may fill: blocks fetched ahead
#: wait there until their reader gets to them, and a window as large as the cache evicts
#: them first (at the shipped 64 MiB each, 14-27 of 256 blocks were fetched twice, in 37-50
#: requests where 23 do: tests/unit/test_reader.py emulating the kernel's read-ahead). The
#: rest holds the blocks being read and other readers'.
WINDOW_SHARE = 0.75


class _Pending:
    """A block fetch in flight that readers of the same block wait on."""

    __slots__ = ("done", "data", "error", "prefetch")

    def __init__(self, prefetch: bool) -> None:
        self.done = trio.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None
        self.prefetch = prefetch


@dataclass
class _Run:
    """Consecutive blocks fetched by one backend request."""

    start: int
    keys: list[Hashable] = field(default_factory=list)
    pendings: list[_Pending] = field(default_factory=list)
    delivered: int = 0
    #: Set once the fetching task gave up (deadline): the abandoned thread's late blocks
    #: are dropped, their pendings already failed.
    dead: bool = False


def exact_chunks(chunks: Iterable[bytes], size: int, length: int) -> Iterator[bytes]:
    """Re-cut a stream of pieces into ``size``-byte blocks (the last one shorter) totalling
    exactly ``length``; raises ``BackendError`` if the stream is short or long."""
    buf = bytearray()
    done = 0
    for piece in chunks:
        if len(piece) == size and not buf and done + size <= length:
            done += size
            yield piece
            continue
        buf += piece
        while len(buf) >= size and done + size <= length:
            yield bytes(buf[:size])
            del buf[:size]
            done += size
        if done + len(buf) > length:
            raise BackendError(f"got more than the {length} bytes asked for")
    if buf:
        done += len(buf)
        yield bytes(buf)
    if done != length:
        raise BackendError(f"short read: {done} of {length} bytes")


class BlockSource:
    """Shared by every reader of a mount: one fetch per block, whoever asks first."""

    def __init__(self, cache: BlockCache, block_size: int, prefetch_bytes: int,
                 nursery: trio.Nursery, fetch_size: int = 16 << 20) -> None:
        self.cache = cache
        self.block_size = block_size
        self.nursery = nursery
        #: Most blocks one backend request fetches.
        self.max_run = max(1, fetch_size // block_size)
        self._pending: dict[Hashable, _Pending] = {}
        #: Prefetch tokens free (one per block in flight); see the module docstring.
        self.tokens = self.max_tokens = max(1, prefetch_bytes // block_size)
        self._disk_readers = trio.CapacityLimiter(DISK_READERS)
        #: The furthest a reader's window reaches ahead, in blocks (``WINDOW_SHARE``).
        self.max_window = max(1, int(cache.memory.max_bytes * WINDOW_SHARE) // block_size)
        #: Backend requests made, for tests and status (runs, not blocks).
        self.requests = 0

    def key(self, store: Store, info: ImageInfo, index: int) -> tuple:
        return (store.id, info.name, info.version, self.block_size, index)

    # ------------------------------------------------------------------ demand reads
    async def blocks(self, store: Store, info: ImageInfo, first: int, last: int,
                     ahead: int = 0) -> list[bytes]:
        """Blocks ``first..last`` of ``info``: from memory, else joining a fetch in flight,
        else from the disk cache, else fetched (the missing ones in one request).

        ``ahead``: a sequential reader's read that must fetch its last block takes up to
        that many of the following blocks into the same request, as prefetch (tokens
        permitting): the kernel's read-ahead asks for them next, and one request each would
        pay a request's whole cost per block."""
        out: list[bytes | None] = [None] * (last - first + 1)
        waits: list[tuple[int, _Pending]] = []
        run: _Run | None = None
        for i in range(first, last + 1):
            key = self.key(store, info, i)
            data = self.cache.get_memory(key)
            stats.cache(store.id, "memory", hit=data is not None)
            if data is not None:
                out[i - first] = data
                self._start(store, info, run)  # a run is consecutive blocks
                run = None
                continue
            p = self._pending.get(key)
            if p is None and self.cache.on_disk(key):
                p = self._load_from_disk(store, info, i, key, prefetch=False)
            if p is not None:
                waits.append((i, p))
                self._start(store, info, run)
                run = None
                continue
            if run is None:
                run = _Run(start=i)
            waits.append((i, self._register(run, key, prefetch=False)))
        if run is not None and ahead > 0:
            self._extend(store, info, run, last + 1, ahead)
        self._start(store, info, run)
        for i, p in waits:
            out[i - first] = await self._wait(store, info, i, p)
        return out  # type: ignore[return-value]

    async def _wait(self, store: Store, info: ImageInfo, index: int, p: _Pending) -> bytes:
        await p.done.wait()
        if p.error is not None and p.prefetch:
            # Its failure was nobody's read: this read tries itself, once.
            key = self.key(store, info, index)
            q = self._pending.get(key)
            if q is None:
                run = _Run(start=index)
                q = self._register(run, key, prefetch=False)
                self._start(store, info, run)
            await q.done.wait()
            p = q
        if p.error is not None:
            if isinstance(p.error, StoreError):
                raise p.error
            raise BackendError(f"block fetch failed: {p.error}")
        assert p.data is not None
        return p.data

    # ------------------------------------------------------------------ prefetch
    def prefetch(self, store: Store, info: ImageInfo, start: int, count: int) -> int:
        """Fetch blocks ``start..start+count-1`` in the background, in one request for each
        stretch not cached or in flight. Returns how many blocks from ``start`` are now
        covered (0: not enough tokens free, try later).

        All ``count`` tokens or none: a prefetch cut to the few tokens free as each block
        arrives splits the stream into 1-3 block requests, each paying a request's whole
        cost (35-50 requests for 128 blocks where 15 do, tests/unit/test_reader.py). A
        read that overtakes the window meanwhile extends its own request instead
        (``blocks(ahead=...)``)."""
        count = min(count, self.max_tokens)
        if self.tokens < count:
            return 0
        run: _Run | None = None  # blocks to fetch
        disk: _Run | None = None  # blocks to read back from the disk cache, in order
        for i in range(start, start + count):
            key = self.key(store, info, i)
            if key in self._pending or self.cache.get_memory(key) is not None:
                self._start(store, info, run)
                self._start_disk(store, info, disk)
                run = disk = None
                continue
            if self.cache.on_disk(key):
                self._start(store, info, run)
                run = None
                if disk is None:
                    disk = _Run(start=i)
                self._register(disk, key, prefetch=True)
                continue
            self._start_disk(store, info, disk)
            disk = None
            if run is None:
                run = _Run(start=i)
            self._register(run, key, prefetch=True)
        self._start(store, info, run)
        self._start_disk(store, info, disk)
        return count

    def _extend(self, store: Store, info: ImageInfo, run: _Run, start: int, count: int
                ) -> None:
        """Add blocks from ``start`` to ``run`` as prefetch, while they are neither cached
        nor in flight and tokens last, up to ``count`` and a run's size."""
        nblocks = -(-info.size // self.block_size)
        for i in range(start, min(start + count, nblocks)):
            key = self.key(store, info, i)
            if (self.tokens <= 0 or len(run.keys) >= self.max_run or key in self._pending
                    or self.cache.get_memory(key) is not None or self.cache.on_disk(key)):
                return
            self._register(run, key, prefetch=True)

    # ------------------------------------------------------------------ fetching
    def _register(self, run: _Run, key: Hashable, prefetch: bool) -> _Pending:
        p = self._pending[key] = _Pending(prefetch)
        if prefetch:
            self.tokens -= 1
        run.keys.append(key)
        run.pendings.append(p)
        return p

    def _resolve(self, key: Hashable, p: _Pending, data: bytes | None = None,
                 error: BaseException | None = None, on_disk: bool = False) -> None:
        if p.done.is_set():
            return
        if data is not None:
            p.data = data
            self.cache.put_memory(key, data)
            if not on_disk:
                self.cache.put_disk_later(key, data)
        else:
            p.error = error or BackendError("block fetch failed")
        if self._pending.get(key) is p:
            del self._pending[key]
        if p.prefetch:
            self.tokens += 1
        p.done.set()

    def _start(self, store: Store, info: ImageInfo, run: _Run | None) -> None:
        """Start fetching ``run`` if it has blocks (callers then begin a new one)."""
        if run is not None and run.keys:
            self.requests += 1
            self.nursery.start_soon(self._fetch_run, store, info, run)
        return None

    async def _fetch_run(self, store: Store, info: ImageInfo, run: _Run) -> None:
        bs = self.block_size
        offset = run.start * bs
        length = min(len(run.keys) * bs, info.size - offset)
        token = trio.lowlevel.current_trio_token()
        stats.cache(store.id, "disk", hit=False, n=len(run.keys))

        def deliver(data: bytes) -> None:
            if run.dead:
                return
            i = run.delivered
            run.delivered += 1
            self._resolve(run.keys[i], run.pendings[i], data=data)

        def fetch() -> None:
            chunks = store.read_chunks(info.name, info.version, offset, length, bs)
            for data in exact_chunks(chunks, bs, length):
                token.run_sync_soon(deliver, data)

        error: BaseException | None = None
        try:
            # Generous: a run is many blocks, each request still has the store's timeout.
            await bridge.call(store, fetch, timeout=store.timeout * 2)
        except Exception as e:
            error = e
            log.debug("store %s: %s: %d bytes at %d: fetch failed: %s", store.id, info.name,
                      length, offset, e)
        except BaseException:
            error = BackendError(f"store {store.id}: {info.name}: fetch cancelled")
            raise
        finally:
            # The thread's deliveries were queued before its completion: all ran by now.
            run.dead = True
            for i in range(run.delivered, len(run.keys)):
                self._resolve(run.keys[i], run.pendings[i],
                              error=error or BackendError(f"store {store.id}: {info.name}: "
                                                          f"short read at {offset}"))

    def _load_from_disk(self, store: Store, info: ImageInfo, index: int, key: Hashable,
                        prefetch: bool) -> _Pending:
        run = _Run(start=index)
        p = self._register(run, key, prefetch)
        self._start_disk(store, info, run)
        return p

    def _start_disk(self, store: Store, info: ImageInfo, run: _Run | None) -> None:
        """Start reading ``run`` back from the disk cache if it has blocks.

        One task per run, reading its blocks in order: with one task per block, the blocks
        of a prefetch waited for the disk threads in whatever order trio started the tasks
        (it may reverse a batch), and a sequential reader stalled at every batch's first
        block for the rest of the batch (5-12 ms, every 16 blocks, in a traced warm re-read
        of 256 MiB). In order, warm re-reads went from 622-756 to 712-858 MB/s (medians of 8
        alternating remounts, S3 and RBD)."""
        if run is not None and run.keys:
            self.nursery.start_soon(self._disk_or_store, store, info, run)

    async def _disk_or_store(self, store: Store, info: ImageInfo, run: _Run) -> None:
        """Blocks the disk cache should hold; those it does not (evicted or corrupt since the
        index said so) are fetched after all."""
        bs = self.block_size
        token = trio.lowlevel.current_trio_token()

        def deliver(i: int, data: bytes | None) -> None:
            want = min(bs, info.size - (run.start + i) * bs)
            if data is not None and len(data) == want:
                stats.cache(store.id, "disk", hit=True)
                self._resolve(run.keys[i], run.pendings[i], data=data, on_disk=True)

        def load() -> None:
            for i, data in enumerate(self.cache.get_disk_run(run.keys)):
                token.run_sync_soon(deliver, i, data)

        try:
            await bridge.local(load, limiter=self._disk_readers)
        except Exception as e:  # a disk cache that cannot be read is a miss
            log.warning("disk cache: %s", e)
        except BaseException:
            for key, p in zip(run.keys, run.pendings, strict=True):
                self._resolve(key, p, error=BackendError(
                    f"store {store.id}: {info.name}: read cancelled"))
            raise
        # The thread's deliveries were queued before its completion: all ran by now. What
        # the cache did not have is fetched, consecutive blocks in one request.
        fetch: _Run | None = None
        for i, (key, p) in enumerate(zip(run.keys, run.pendings, strict=True)):
            if p.done.is_set():
                self._start(store, info, fetch)
                fetch = None
                continue
            if fetch is None or len(fetch.keys) >= self.max_run:
                self._start(store, info, fetch)
                fetch = _Run(start=run.start + i)
            fetch.keys.append(key)
            fetch.pendings.append(p)
        self._start(store, info, fetch)


class Reader:
    """One open handle's view of one image version."""

    def __init__(self, source: BlockSource, store: Store, info: ImageInfo, readahead: int) -> None:
        self.source = source
        self.store = store
        self.info = info
        bs = source.block_size
        self._max_window = max(1, min(readahead // bs, source.max_window))
        #: How far from the furthest read so far a read may land and still be sequential.
        self._slack = max(self._max_window, 8) * bs
        #: End of the furthest read of the current stretch; None before the first read,
        #: which never prefetches on its own (``qemu-img info`` reads a header, then stops).
        self._end: int | None = None
        self._sequential = False
        self._stretch = 0      # bytes read in the current stretch
        self._window = 0       # blocks to keep fetched ahead of the reader
        self._ahead = -1       # last block requested ahead

    async def read(self, offset: int, size: int) -> bytes | memoryview:
        info = self.info
        if offset >= info.size or size <= 0:
            return b""
        end = min(offset + size, info.size)
        if self.store.local:
            data = await bridge.call(self.store, self.store.read_range, info.name,
                                     info.version, offset, end - offset)
            if len(data) != end - offset:  # cut in place under us: an error, not an early EOF
                raise BackendError(f"store {self.store.id}: {info.name}: asked {end - offset} "
                                   f"bytes at {offset}, got {len(data)}")
            return data
        bs = self.source.block_size
        first, last = offset // bs, (end - 1) // bs
        self._track(offset, end, last)
        blocks = await self.source.blocks(self.store, info, first, last,
                                          ahead=self.source.max_run if self._sequential else 0)
        if self._sequential:
            self._passed(first, end)
        if first == last:
            block = blocks[0]
            a, b = offset - first * bs, end - first * bs
            return block if (a, b) == (0, len(block)) else memoryview(block)[a:b]
        return b"".join(blocks)[offset - first * bs:end - first * bs]

    def _track(self, offset: int, end: int, last: int) -> None:
        """Follow the access pattern; keep the prefetch window topped up while sequential.

        Until a stretch is sequential, a read continues it only next to the last one, and
        prefetch starts once it has read two blocks' worth (a header probe such as
        ``qemu-img info`` reads less). Then the kernel's read-ahead is tolerated: many
        requests in flight, answered in any order."""
        bs = self.source.block_size
        slack = self._slack if self._sequential else 2 * bs
        if self._end is None or not self._end - slack <= offset <= self._end + slack:
            self._sequential = False
            self._window = 0
            self._stretch = end - offset
            self._end = end
            self._ahead = last
            return
        self._stretch += end - offset
        self._end = max(self._end, end)
        if not self._sequential and self._stretch < 2 * bs:
            return
        self._sequential = True
        self._window = min(self._max_window, max(2, self._window * 2))
        self._top_up(last)

    def _passed(self, first: int, end: int) -> None:
        """Blocks this sequential read finished go first when memory is needed (the kernel's
        page cache and the disk cache serve a re-read), so the prefetched blocks still ahead
        of the reader stay (see ``MemoryCache``)."""
        src = self.source
        bs = src.block_size
        done = end // bs - 1 if end < self.info.size else (end - 1) // bs
        for i in range(first, done + 1):
            src.cache.demote_memory(src.key(self.store, self.info, i))

    def _top_up(self, last: int) -> None:
        src = self.source
        nblocks = -(-self.info.size // src.block_size)
        start = max(last + 1, self._ahead + 1)
        stop = min(last + self._window, nblocks - 1)
        missing = stop - start + 1
        # Wait for a stretch worth one request (not a 1-block GET per read) unless it is
        # the image's tail.
        if missing <= 0 or (missing < min(src.max_run, max(1, self._window // 2))
                            and stop < nblocks - 1):
            return
        while start <= stop:
            n = src.prefetch(self.store, self.info, start, min(src.max_run, stop - start + 1))
            if n == 0:
                return
            start += n
            self._ahead = start - 1
