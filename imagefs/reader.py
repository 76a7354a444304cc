"""Open-for-read state: block math, cache lookups, de-duplicated fetches and prefetch.

A ``Reader`` is pinned to the ``ImageInfo`` seen at open: every block key includes its version
and every backend read asks for that version, so a reader never mixes two images (the store
raises ``Changed`` instead, which becomes EIO).

Memory stays bounded: fetched blocks live in the size-bounded memory LRU; fetches in flight are
bounded by each store's thread limit; prefetch takes a token from a global semaphore sized by
``cache.max_prefetch_memory`` and is skipped, not queued, when none is free.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable

import trio

from imagefs import bridge
from imagefs.cache import BlockCache
from imagefs.stores.base import BackendError, ImageInfo, Store

log = logging.getLogger(__name__)


class _Pending:
    """A fetch in flight that other readers of the same block wait on."""

    def __init__(self, prefetch: bool) -> None:
        self.done = trio.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None
        self.prefetch = prefetch


class BlockSource:
    """Shared by every reader of a mount: one fetch per block, whoever asks first."""

    def __init__(self, cache: BlockCache, block_size: int, prefetch_bytes: int,
                 nursery: trio.Nursery) -> None:
        self.cache = cache
        self.block_size = block_size
        self.nursery = nursery
        self._pending: dict[Hashable, _Pending] = {}
        self._prefetch = trio.Semaphore(max(1, prefetch_bytes // block_size))
        # Blocks waiting for the disk cache; a block that finds none free is not stored there
        # (bounded memory: at most 16 blocks), so reads never wait on the disk cache.
        self._disk_writes = trio.Semaphore(16)

    def key(self, store: Store, info: ImageInfo, index: int) -> tuple:
        return (store.id, info.name, info.version, self.block_size, index)

    async def block(self, store: Store, info: ImageInfo, index: int,
                    prefetch: bool = False) -> bytes:
        key = self.key(store, info, index)
        data = self.cache.get_memory(key)
        if data is not None:
            return data
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = _Pending(prefetch)
            try:
                pending.data = await self._fetch(store, info, index, key)
            except BaseException as e:
                pending.error = e
                raise
            finally:
                del self._pending[key]
                pending.done.set()
            return pending.data
        await pending.done.wait()
        if pending.error is not None:
            if pending.prefetch:  # its failure was nobody's read: this read tries itself
                return await self.block(store, info, index)
            raise BackendError(f"block fetch failed: {pending.error}")
        assert pending.data is not None
        return pending.data

    async def _fetch(self, store: Store, info: ImageInfo, index: int, key: Hashable) -> bytes:
        offset = index * self.block_size
        want = min(self.block_size, info.size - offset)
        data = await bridge.local(self.cache.get_disk, key)
        if data is not None and len(data) == want:
            self.cache.put_memory(key, data)
            return data
        data = await bridge.call(store, store.read_range, info.name, info.version, offset, want)
        if len(data) != want:
            raise BackendError(f"store {store.id}: {info.name}: asked {want} bytes at {offset}, "
                               f"got {len(data)}")
        self.cache.put_memory(key, data)
        if self._disk_writes.value:
            self.nursery.start_soon(self._store_on_disk, key, data)
        return data

    async def _store_on_disk(self, key: Hashable, data: bytes) -> None:
        """Best effort, in the mount's nursery: an exception here would end the mount."""
        async with self._disk_writes:
            try:
                await bridge.local(self.cache.put_disk, key, data)
            except Exception as e:
                log.warning("disk cache: block not stored: %s", e)

    def prefetch(self, store: Store, info: ImageInfo, index: int) -> bool:
        """Start fetching a block in the background if a token is free; False when skipped."""
        key = self.key(store, info, index)
        if key in self._pending or self.cache.get_memory(key) is not None:
            return True
        try:
            self._prefetch.acquire_nowait()
        except trio.WouldBlock:
            return False
        self.nursery.start_soon(self._prefetch_one, store, info, index)
        return True

    async def _prefetch_one(self, store: Store, info: ImageInfo, index: int) -> None:
        try:
            await self.block(store, info, index, prefetch=True)
        except Exception as e:  # a prefetch failure is retried by the real read, which reports it
            log.debug("prefetch of %s/%s block %d failed: %s", store.id, info.name, index, e)
        finally:
            self._prefetch.release()


class Reader:
    """One open handle's view of one image version."""

    def __init__(self, source: BlockSource, store: Store, info: ImageInfo, readahead: int) -> None:
        self.source = source
        self.store = store
        self.info = info
        self._next = 0
        self._streak = 0
        self._window = max(1, readahead // source.block_size)
        self._prefetched_to = -1

    async def read(self, offset: int, size: int) -> bytes:
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
        self._streak = self._streak + 1 if offset == self._next else 0
        self._next = end
        if self._streak == 0:
            self._prefetched_to = last
        elif self._streak >= 2:
            self._start_prefetch(last)
        if first == last:
            block = await self.source.block(self.store, info, first)
            return block[offset - first * bs:end - first * bs]
        parts = [await self.source.block(self.store, info, i) for i in range(first, last + 1)]
        return b"".join(parts)[offset - first * bs:end - first * bs]

    def _start_prefetch(self, last: int) -> None:
        nblocks = (self.info.size + self.source.block_size - 1) // self.source.block_size
        start = max(last + 1, self._prefetched_to + 1)
        stop = min(last + self._window, nblocks - 1)
        for i in range(start, stop + 1):
            if not self.source.prefetch(self.store, self.info, i):
                break
            self._prefetched_to = i
