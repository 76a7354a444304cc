"""Glance hashes for images whose close did not compute them, after they were published.

A close hashes only what did not stream through the hasher in order, up to
``hash.inline_max``; past it (a sparse ``qemu-img create``, a ``truncate -s 1T``, writes out of
order on file and rbd stores) the image is published without hashes so close() returns in
about the time the backend takes. Such images are queued here and hashed one at a time by
reading the published version back; the result is stored only if the image is still that
version (``set_meta(expect=version)``), never beside another version's bytes. The queue is
bounded; what does not fit, or is bigger than ``hash.background_max``, is left to
``imagefs hash``. Unmounting cancels the job in progress: nothing partial is stored.

An image that is being changed (a writer holds changes not yet published) waits: hashing a
version that is about to be replaced is work for nothing, and qemu-img does exactly that, as
``convert`` and ``create`` publish an empty image, reopen it and write it again. Measured
here, the hash of that empty 256 MiB image ran beside the conversion and took a second of CPU
from it. A version a newer one replaced is dropped, also in the middle of its hash.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from imagefs import bridge
from imagefs.hashing import ImageHasher
from imagefs.stores.base import Changed, ImageInfo, NotFound, Store, StoreError

log = logging.getLogger(__name__)

CHUNK = 4 << 20
QUEUE = 64
#: Seconds between looks at an image that is being changed.
DEFER = 2.0


class BackgroundHasher:
    """One task per mount; ``submit`` never blocks the caller."""

    def __init__(self, algo: str, max_size: int,
                 long_timeout: Callable[[Store, int], float],
                 on_done: Callable[[Store, ImageInfo], None],
                 changing: Callable[[str, str], bool] = lambda _store, _name: False,
                 defer: float = DEFER) -> None:
        """``changing(store id, name)``: a writer holds unpublished changes to that image."""
        self.algo = algo
        self.max_size = max_size
        self._long_timeout = long_timeout
        self._on_done = on_done
        self._changing = changing
        self._defer = defer
        #: Hash jobs put off because their image was being changed (for tests and status).
        self.deferred = 0
        self._send, self._recv = trio.open_memory_channel[tuple[Store, ImageInfo]](QUEUE)
        #: (store id, name) → version queued or being hashed; a newer version replaces it.
        self.pending: dict[tuple[str, str], str] = {}

    def submit(self, store: Store, info: ImageInfo) -> None:
        if info.size > self.max_size:
            log.info("%s/%s: %d bytes is more than hash.background_max: not hashed; "
                     "`imagefs hash` computes its hashes", store.id, info.name, info.size)
            return
        try:
            self._send.send_nowait((store, info))
        except trio.WouldBlock:
            log.warning("%s/%s: background hash queue full: not hashed; `imagefs hash` "
                        "computes its hashes", store.id, info.name)
            return
        self.pending[(store.id, info.name)] = info.version

    async def run(self) -> None:
        async with trio.open_nursery() as later:
            async for store, info in self._recv:
                if not self._current(store, info):
                    continue
                finished = True
                try:
                    finished = await self._hash(store, info)
                finally:
                    if not finished:
                        self.deferred += 1
                        later.start_soon(self._again, store, info)
                    elif self._current(store, info):
                        del self.pending[(store.id, info.name)]

    async def _again(self, store: Store, info: ImageInfo) -> None:
        """Queue a put-off job again after a while, unless a newer version replaced it."""
        await trio.sleep(self._defer)
        if not self._current(store, info):
            return
        try:
            self._send.send_nowait((store, info))
        except trio.WouldBlock:
            del self.pending[(store.id, info.name)]
            log.warning("%s/%s: background hash queue full: not hashed; `imagefs hash` "
                        "computes its hashes", store.id, info.name)

    def _current(self, store: Store, info: ImageInfo) -> bool:
        """``info`` is still the version queued for its image (no newer one replaced it)."""
        return self.pending.get((store.id, info.name)) == info.version

    async def _hash(self, store: Store, info: ImageInfo) -> bool:
        """Hash one version and store the result; False if it was put off (being changed)."""
        h = ImageHasher(self.algo)
        try:
            for off in range(0, info.size, CHUNK):
                if not self._current(store, info):
                    return True  # a newer version replaced it: that one is queued
                if self._changing(store.id, info.name):
                    return False
                n = min(CHUNK, info.size - off)
                data = await bridge.call(store, store.read_range, info.name, info.version,
                                         off, n)
                if len(data) != n:
                    raise StoreError(f"short read at {off}: {len(data)} of {n} bytes")
                await bridge.local(h.update, data)
            new = await bridge.call(store, store.set_meta, info.name, h.meta(), info.version,
                                    timeout=self._long_timeout(store, info.size))
        except (Changed, NotFound):
            log.info("%s/%s: replaced or removed before its hashes were stored; skipped",
                     store.id, info.name)
            return True
        except StoreError as e:
            log.warning("%s/%s: background hashing failed (%s); `imagefs hash` computes its "
                        "hashes", store.id, info.name, e)
            return True
        log.info("%s/%s: hashes stored (%d bytes)", store.id, info.name, info.size)
        self._on_done(store, new)
        return True
