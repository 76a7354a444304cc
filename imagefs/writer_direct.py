"""``DirectWriter``: written bytes go straight into the store's hidden upload, at any offset.

For stores with ``Capability.RANDOM_WRITE`` (file, rbd, cinder). All-zero writes past
everything written become a size change, so sparse images stay sparse. Hashes are computed as
bytes arrive in order (the bytes a change starts from only once a write appends to them); a
close hashes at most ``hash_inline_max`` bytes that did not (holes, writes out of order), past
it the image is published without hashes (hashed later).

Writes are queued (imagefs.upload_queue): the store write and the hashing of one write overlap
each other and the next write. Everything that must see the written bytes (a read, a truncate,
fsync, publish) drains the queue first, and a failure in it fails every later call.
"""

from __future__ import annotations

import logging

import trio

from imagefs import bridge
from imagefs.hashing import ImageHasher
from imagefs.stores.base import ImageInfo, Store, Upload
from imagefs.upload_queue import UploadQueue
from imagefs.writer import CHUNK, Writer, WriterSettings

log = logging.getLogger(__name__)


def _all_zero(data: bytes) -> bool:
    return not data or (data[0] == 0 and data[-1] == 0 and data.count(0) == len(data))


class DirectWriter(Writer):
    PUBLISH_FAILURE_LOSES_BYTES = True

    def __init__(self, store: Store, name: str, base: ImageInfo | None, mode: int,
                 settings: WriterSettings, nursery: trio.Nursery, existed: bool = False) -> None:
        super().__init__(store, name, base, mode, settings, nursery, existed)
        self._upload: Upload | None = None
        self._queue: UploadQueue | None = None  # the queue of ``_upload``
        self._extent = 0  # end of the furthest byte actually written to the upload
        #: Every byte below ``_hash_end`` went (or is queued to go) through the hasher in
        #: order; ``_hasher.offset`` reaches it once the queue is drained.
        self._hash_ok = True
        self._hash_end = 0
        #: Seeded bytes not hashed yet (see ``_seed``): the hasher starts at this offset.
        self._seed_unhashed = 0

    async def _upload_now(self) -> Upload:
        if self._upload is None:
            up = self._upload = await self._new_upload()
            self._queue = UploadQueue(self.store, up.write, self._hash_piece,
                                       self.settings.write_budget, self.nursery)
        return self._upload

    def _hash_piece(self, gap: int, data: bytes) -> None:
        self._hasher.update_zeros(gap)
        self._hasher.update(data)

    async def _drained(self) -> None:
        """Every queued write is in the upload (and hashed); else the queue's failure."""
        if self._queue is not None:
            try:
                await self._queue.drain()
            except BaseException as e:
                self._lose(e)  # fsync too: the pending bytes are unknown from here on
                raise

    async def _seed(self, end: int) -> None:
        """Copy the published bytes into the upload, not hashing them yet.

        Only a write that continues them in order (an append) needs them hashed first, and
        ``_hash_seed`` does it then; after any other write the close re-reads the image or
        leaves it to the background hasher anyway. Hashing while seeding cost qemu-img
        convert (which creates the image, then reopens it and writes out of order) a hash of
        the whole image for nothing: 4.4 ms of CPU per MiB on this machine.
        """
        up = await self._upload_now()
        self._hasher = ImageHasher(self.settings.hash_algo)
        self._hash_ok = True
        await self._copy_published(up.write, end, sink_is_store=True)
        self._extent = self._hash_end = self._seed_unhashed = end

    async def _hash_seed(self) -> None:
        """An append to a seeded image: hash the published bytes it continues, in order."""
        h = self._hasher
        await self._copy_published(lambda _off, data: h.update(data), self._seed_unhashed,
                                   sink_is_store=False)
        self._seed_unhashed = 0

    async def _write(self, offset: int, data: bytes) -> None:
        await self._upload_now()
        assert self._queue is not None
        self._queue.check()
        if offset >= self._extent and _all_zero(data):
            return  # a hole: publishing sets the size, nothing is allocated
        in_order = self._hash_ok and offset >= self._hash_end and offset >= self._extent
        if in_order and offset - self._hash_end > self.settings.hash_inline_max:
            in_order = False  # a hole too big to hash here: the image is hashed later
        if in_order and self._seed_unhashed:
            await self._hash_seed()  # no hashed write is queued before this one
        await self._queue.submit(offset, data, offset - self._hash_end if in_order else None)
        if in_order:
            self._hash_end = offset + len(data)
        else:
            self._hash_ok = False
        self._extent = max(self._extent, offset + len(data))

    async def _read(self, offset: int, size: int) -> bytes:
        if self._upload is None:
            return bytes(size)
        await self._drained()
        return await bridge.call(self.store, self._upload.read, offset, size)

    async def _truncate(self, size: int) -> None:
        up = await self._upload_now()
        await self._drained()
        await bridge.call(self.store, up.truncate, size)
        self._extent = min(self._extent, size)
        if size < self._hash_end:
            self._hash_ok = False

    async def _sync(self) -> None:
        if self._upload is not None:
            await self._drained()
            await bridge.call(self.store, self._upload.flush)

    async def _publish(self, meta: dict[str, str]) -> ImageInfo:
        up = await self._upload_now()
        await self._drained()
        size, h = self.size, self._hasher
        in_order = self._hash_ok and not self._seed_unhashed and h.offset <= size
        unhashed = size - h.offset if in_order else size
        inline = unhashed <= self.settings.hash_inline_max
        if not inline:
            log.info("%s/%s: %d bytes were not hashed as they were written (holes or writes "
                     "out of order); publishing without hashes, they are computed afterwards",
                     self.store.id, self.name, unhashed)

        def finish() -> ImageInfo:
            up.truncate(size)  # the writer's size is the truth, whatever the upload counted
            if not inline:
                return up.commit(meta)
            hasher = h
            if in_order:
                h.update_zeros(size - h.offset)
            else:
                hasher = ImageHasher(self.settings.hash_algo)
                for off in range(0, size, CHUNK):
                    data = up.read(off, min(CHUNK, size - off))
                    hasher.update(data + bytes(min(CHUNK, size - off) - len(data)))
            return up.commit({**meta, **hasher.meta()})

        try:
            info = await bridge.call(self.store, finish, timeout=self._long())
        except BaseException:
            self._upload = self._queue = None
            await self._abort_quietly(up)
            raise
        self._upload = self._queue = None
        return info

    def _after_publish(self) -> None:
        self._hash_ok = True
        self._seeded = False  # the upload is spent; a later change starts from `base`
        self._extent = self._hash_end = self._seed_unhashed = 0

    async def _discard(self) -> None:
        if self._queue is not None:
            with trio.CancelScope(shield=True):
                await self._queue.settle()  # no queued write may land after the abort
        if self._upload is not None:
            await self._abort_quietly(self._upload)
        self._upload = self._queue = None
