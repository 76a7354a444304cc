"""``SpoolWriter``: written bytes land in a local spool file, streamed to the store in order.

For stores whose uploads take sequential offsets only (s3, swift). Every write lands in an
anonymous local spool file; while writes stay sequential a background task streams the spool to
the store's upload as it grows. The first write below the high-water mark stops streaming;
publishing then uploads the whole spool. The spool is what makes the fall-back possible without
reading anything back from the backend.

Once ``spool_trim_after`` bytes have streamed in order, the bytes already sent are dropped from
the spool (hole punching), so a 300 GiB ``cp`` needs no 300 GiB of local disk; the fall-back is
then impossible, and a later write, read or truncate before the end fails with EIO (and a log
line) rather than publish wrong bytes.
"""

from __future__ import annotations

import ctypes
import logging
import os
import tempfile

import trio

from imagefs import bridge
from imagefs.hashing import ImageHasher
from imagefs.stores.base import BackendError, ImageInfo, Store, Upload
from imagefs.writer import CHUNK, Writer, WriterSettings

log = logging.getLogger(__name__)


def _send_from_spool(fd: int, up: Upload, hasher: ImageHasher, offset: int, n: int) -> None:
    """Upload ``n`` spool bytes at ``offset`` (holes read as zeros) and hash them, in a thread."""
    up.write_from(fd, offset, n, hasher.update)


_libc = ctypes.CDLL(None, use_errno=True)
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free a range of a file's blocks, keeping its size (Linux fallocate; no os wrapper)."""
    if _libc.fallocate(fd, _FALLOC_FL_KEEP_SIZE | _FALLOC_FL_PUNCH_HOLE,
                       ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class SpoolWriter(Writer):
    def __init__(self, store: Store, name: str, base: ImageInfo | None, mode: int,
                 settings: WriterSettings, nursery: trio.Nursery, existed: bool = False) -> None:
        super().__init__(store, name, base, mode, settings, nursery, existed)
        self._spool: int | None = None
        self._hw = 0
        self._streamed = 0
        self._sequential = True
        self._stream_upload: Upload | None = None
        #: Spool bytes below this offset were sent and dropped: no fall-back below it.
        self._trimmed = 0
        self._no_trim = False
        self._stream_error: BaseException | None = None
        self._stream_running = False
        self._stream_done = trio.Event()
        self._wake = trio.Event()
        self._finishing = False

    def _open_spool(self) -> int:
        self.settings.spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, path = tempfile.mkstemp(prefix="spool-", dir=self.settings.spool_dir)
        os.unlink(path)  # anonymous: a crash leaves nothing behind
        return fd

    async def _spool_now(self) -> int:
        if self._spool is None:
            self._spool = await bridge.local(self._open_spool)
        return self._spool

    def _refuse_trimmed(self, what: str, offset: int) -> None:
        """After trimming, only writes at the end can keep the image whole."""
        if self._trimmed:
            log.error("%s/%s: %s at offset %d, but the first %d bytes were already uploaded "
                      "and dropped from the local spool (cache.spool_trim_after); this image "
                      "cannot be completed", self.store.id, self.name, what, offset,
                      self._trimmed)
            raise BackendError(f"{self.store.id}/{self.name}: {what} before the end of a "
                               f"streamed upload whose spool was trimmed")

    # ---------------------------------------------------------------- the strategy
    async def _seed(self, end: int) -> None:
        fd = await self._spool_now()
        await bridge.local(os.ftruncate, fd, 0)
        await self._copy_published(lambda off, data: os.pwrite(fd, data, off), end,
                                   sink_is_store=False)
        self._hw = end
        self._sequential = False if self._streamed else self._sequential
        if self._hw:
            self._start_stream()

    async def _write(self, offset: int, data: bytes) -> None:
        fd = await self._spool_now()
        if offset < self._hw:
            self._refuse_trimmed("write", offset)
            self._sequential = False
        await bridge.local(os.pwrite, fd, data, offset)
        self._hw = max(self._hw, offset + len(data))
        if self._sequential:
            self._start_stream()
            self._wake.set()

    async def _read(self, offset: int, size: int) -> bytes:
        if offset < self._trimmed:
            self._refuse_trimmed("read", offset)
        data = await bridge.local(os.pread, self._spool, size, offset)
        if offset < self._trimmed:  # the stream trimmed it while we read
            self._refuse_trimmed("read", offset)
        return data

    async def _truncate(self, size: int) -> None:
        fd = await self._spool_now()
        if size < self._hw:
            self._refuse_trimmed("truncate", size)
            self._sequential = False
            self._hw = size
        await bridge.local(os.ftruncate, fd, size)

    async def _sync(self) -> None:
        if self._sequential and self._stream_error is None and self._stream_running:
            while self._streamed < self._hw and self._stream_running:
                await trio.sleep(0.01)
        if self._stream_error is not None:
            raise BackendError(f"{self.store.id}/{self.name}: upload failed: "
                               f"{self._stream_error}")

    async def _publish(self, meta: dict[str, str]) -> ImageInfo:
        await self._spool_now()
        size = self.size
        if self._sequential and self._stream_error is None:
            self._hw = max(self._hw, size)  # a size set by truncate streams as zeros
            self._start_stream()
            self._finishing = True
            self._wake.set()
            await self._stream_done.wait()
            self._finishing = False
        if self._sequential and self._stream_error is None and self._streamed == size:
            up = self._stream_upload or await self._new_upload()
            hasher = self._hasher
            self._stream_upload = None
        elif self._trimmed:
            raise BackendError(f"{self.store.id}/{self.name}: the streamed upload failed "
                               f"({self._stream_error}) after its spool was trimmed; not "
                               f"published")
        else:
            up, hasher = await self._upload_whole_spool(size)
        try:
            info = await bridge.call(self.store, up.commit, {**meta, **hasher.meta()},
                                     timeout=self._long())
        except BaseException:
            await self._abort_quietly(up)
            self._sequential = False
            raise
        return info

    async def _upload_whole_spool(self, size: int) -> tuple[Upload, ImageHasher]:
        """The fall-back: streaming stopped (or failed), so the spool goes up in one pass."""
        await self._drop_stream()
        self._stream_error = None
        up = await self._new_upload()
        hasher = ImageHasher(self.settings.hash_algo)
        fd = self._spool

        def send_all() -> None:
            for off in range(0, size, CHUNK):
                _send_from_spool(fd, up, hasher, off, min(CHUNK, size - off))

        try:
            await bridge.call(self.store, send_all, timeout=self._long())
        except BaseException:
            await self._abort_quietly(up)
            raise
        return up, hasher

    def _after_publish(self) -> None:
        if self._trimmed:
            # The spool lost its head: a later change starts again from `base`.
            self._seeded = False
            self._trimmed = 0
            self._sequential = True
            self._streamed = 0
        else:
            self._sequential = False  # the spool has it all; a later change re-uploads

    async def _discard(self) -> None:
        await self._stop_stream()
        if self._stream_upload is not None:
            await self._abort_quietly(self._stream_upload)
        self._stream_upload = None
        if self._spool is not None:
            os.close(self._spool)
            self._spool = None

    # ---------------------------------------------------------------- streaming
    def _start_stream(self) -> None:
        if not self._stream_running and self._sequential and self._stream_error is None:
            self._stream_running = True
            self._stream_done = trio.Event()
            self.nursery.start_soon(self._stream)

    async def _stream(self) -> None:
        """Send the spool's sequential prefix to the store while the writer goes on."""
        h = self._hasher
        try:
            while self._sequential:
                if self._streamed < self._hw:
                    if self._stream_upload is None:
                        self._stream_upload = await self._new_upload()
                    off = self._streamed
                    n = min(CHUNK, self._hw - off)
                    await bridge.call(self.store, _send_from_spool, self._spool,
                                      self._stream_upload, h, off, n)
                    self._streamed = off + n
                    await self._trim()
                elif self._finishing:
                    return
                else:
                    await self._wake.wait()
                    self._wake = trio.Event()
        except Exception as e:
            log.warning("%s/%s: streaming upload failed (%s); will upload from the spool at "
                        "close", self.store.id, self.name, e)
            self._stream_error = e
        finally:
            self._stream_running = False
            self._stream_done.set()

    async def _trim(self) -> None:
        """Punch out of the spool what was sent, once the image is big and still in order."""
        limit = self.settings.spool_trim_after
        if (not limit or self._no_trim or not self._sequential or self._streamed < limit
                or self._spool is None):
            return
        end = self._streamed & ~(CHUNK - 1)
        if end - self._trimmed < 16 * CHUNK:
            return  # in 64 MiB steps: few syscalls
        try:
            await bridge.local(punch_hole, self._spool, self._trimmed, end - self._trimmed)
        except OSError as e:
            log.warning("%s/%s: cannot drop sent bytes from the spool (%s); keeping them",
                        self.store.id, self.name, e)
            self._no_trim = True
            return
        self._trimmed = end

    async def _stop_stream(self) -> None:
        """Stop the streaming task and wait until it has ended: a chunk still in flight would
        otherwise fail against an aborted upload later and set ``_stream_error`` after it was
        cleared (a later fsync would report a failure that did not happen)."""
        self._sequential = False
        self._wake.set()
        if self._stream_running:
            await self._stream_done.wait()

    async def _drop_stream(self) -> None:
        await self._stop_stream()
        up, self._stream_upload = self._stream_upload, None
        self._streamed = 0
        if up is not None:
            await bridge.call(self.store, up.abort)
