"""Open-for-write state: where written bytes go until the image is published.

Two shapes, chosen by the store's capabilities:

* **direct** (stores with ``random_write``: file, rbd): writes go straight into the store's
  hidden upload at any offset; all-zero writes past everything written become a size change, so
  sparse images stay sparse.
* **spool** (s3, swift): every write lands in an anonymous local spool file; while writes stay
  sequential a background task streams the spool to the store's upload as it grows. The first
  write below the high-water mark stops streaming; publishing then uploads the whole spool. The
  spool is what makes the fall-back possible without reading anything back from the backend.
  Once ``spool_trim_after`` bytes have streamed in order, the bytes already sent are dropped
  from the spool (hole punching), so a 300 GiB ``cp`` needs no 300 GiB of local disk; the
  fall-back is then impossible, and a later write, read or truncate before the end fails with
  EIO (and a log line) rather than publish wrong bytes.

Publishing (flush, fsync, release) is the only moment an image becomes visible under its name.
An image opened for writing without O_TRUNC is seeded with its published bytes on the first
change, so partial rewrites keep the rest. Hashes (Glance multihash + md5) are computed on the
bytes as they stream whenever they arrive in order, otherwise in the single pass that publishes.
"""

from __future__ import annotations

import ctypes
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from imagefs import bridge
from imagefs.hashing import ImageHasher
from imagefs.stores.base import (
    META_GID,
    META_MODE,
    META_MTIME,
    META_UID,
    BackendError,
    Capability,
    ImageInfo,
    Store,
    Upload,
)

log = logging.getLogger(__name__)

CHUNK = 4 << 20


@dataclass(frozen=True)
class WriterSettings:
    spool_dir: Path
    hash_algo: str
    #: Multiplier of the store timeout for calls that move a whole image (commit, full upload).
    commit_timeout_factor: float = 20.0
    #: See the module docstring; 0 never trims.
    spool_trim_after: int = 0
    #: Plus one second per this many bytes: a 300 GiB image may take longer than any fixed
    #: deadline, yet a stalled backend must still end in EIO (each request has its own timeout).
    commit_min_rate: int = 4 << 20
    #: Hashing a close may still do (bytes that did not stream through the hasher in order,
    #: holes included). Past it the image is published without hashes and ``on_unhashed``
    #: gets it (the mount hashes it in the background): ``qemu-img create -f raw IMG 1T``
    #: must not sit in close() hashing a terabyte of zeros.
    hash_inline_max: int = 64 << 20
    #: Images published without hashes up to this size are hashed in the background.
    hash_background_max: int = 64 << 30

    def long_timeout(self, store: Store, size: int) -> float:
        """Deadline of a call that moves ``size`` bytes at once (publish, server-side copy)."""
        return store.timeout * self.commit_timeout_factor + size / self.commit_min_rate


def _send_from_spool(fd: int, up: Upload, hasher: ImageHasher, offset: int, n: int) -> None:
    """Upload ``n`` spool bytes at ``offset`` (holes read as zeros) and hash them, in a thread."""
    data = os.pread(fd, n, offset)
    data += bytes(n - len(data))
    up.write(offset, data)
    hasher.update(data)


_libc = ctypes.CDLL(None, use_errno=True)
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free a range of a file's blocks, keeping its size (Linux fallocate; no os wrapper)."""
    if _libc.fallocate(fd, _FALLOC_FL_KEEP_SIZE | _FALLOC_FL_PUNCH_HOLE,
                       ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _all_zero(data: bytes) -> bool:
    return not data or (data[0] == 0 and data[-1] == 0 and data.count(0) == len(data))


class Writer:
    """The pending new version of one image, shared by the handles that write it."""

    def __init__(self, store: Store, name: str, base: ImageInfo | None, mode: int,
                 settings: WriterSettings, nursery: trio.Nursery, existed: bool = False) -> None:
        self.store = store
        self.name = name
        #: An image was published under ``name`` when this writer began (also when it began
        #: with O_TRUNC, so without a ``base``): until this writer publishes, that image is
        #: what the name shows.
        self.existed = existed or base is not None
        self.base = base
        self.mode = mode
        self.mtime: float | None = None
        #: uid/gid metadata set by chown while unpublished (stores with ``chown = "keep"``).
        self.owner: dict[str, str] = {k: base.meta[k] for k in (META_UID, META_GID)
                                      if base is not None and k in base.meta}
        self.settings = settings
        self.nursery = nursery
        self.dirty = base is None
        self.size = base.size if base else 0
        self.published: ImageInfo | None = None
        #: Why the last publish failed; cleared by the next change. The last close does not
        #: retry a publish whose failure a flush already reported (it would fail the same way).
        self.publish_error: BaseException | None = None
        #: A write or truncate that failed (or timed out, its thread possibly still running)
        #: leaves the pending image with unknown content: it must never be published.
        self.poisoned: BaseException | None = None
        #: The writer asked for its pending bytes to be dropped (``imagefs copy`` after a
        #: failure elsewhere): nothing is published, later writes fail.
        self.cancelled = False
        #: Made for one operation (truncate(2) on a path): no handle may join it.
        self.private = False
        #: The last handle's release has begun (publish, then discard): no handle may join
        #: this writer any more, its bytes are being published or dropped. An open arriving
        #: meanwhile waits for ``closed`` and starts from what the release published.
        self.closing = False
        self.closed = trio.Event()
        self.direct = Capability.RANDOM_WRITE in store.capabilities
        self._seeded = base is None
        self._lock = trio.Lock()
        self._hasher = ImageHasher(settings.hash_algo)
        self._hash_ok = True
        # direct mode
        self._upload: Upload | None = None
        self._extent = 0  # end of the furthest byte actually written to the upload
        # spool mode
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

    # ---------------------------------------------------------------- helpers
    def _long(self) -> float:
        return self.settings.long_timeout(self.store, self.size)

    async def _new_upload(self) -> Upload:
        return await bridge.call(self.store, self.store.upload, self.name, self.size or None)

    def _open_spool(self) -> int:
        self.settings.spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, path = tempfile.mkstemp(prefix="spool-", dir=self.settings.spool_dir)
        os.unlink(path)  # anonymous: a crash leaves nothing behind
        return fd

    async def _copy_published(self, sink: Callable[[int, bytes], None], end: int) -> None:
        """Feed the published bytes of ``base`` below ``end`` to ``sink`` in order."""
        base = self.base
        assert base is not None
        for off in range(0, end, CHUNK):
            n = min(CHUNK, end - off)
            data = await bridge.call(self.store, self.store.read_range, base.name, base.version,
                                     off, n)
            if len(data) != n:
                raise BackendError(f"{self.store.id}/{base.name}: short read while seeding")
            if self.direct:  # the sink writes to the store: under its deadline
                await bridge.call(self.store, sink, off, data)
            else:
                await bridge.local(sink, off, data)

    async def _ensure_seeded(self, upto: int | None = None) -> None:
        """Start the pending image from the published one: only its first ``upto`` bytes
        when a truncate follows (``dd`` truncates to 0 first: nothing to fetch)."""
        if self._seeded:
            return
        end = self.base.size if self.base else 0
        if upto is not None:
            end = min(end, upto)
        if self.direct:
            if self._upload is None:
                self._upload = await self._new_upload()
            up = self._upload
            self._hasher = ImageHasher(self.settings.hash_algo)
            self._hash_ok = True

            def sink(off: int, data: bytes) -> None:
                up.write(off, data)
                self._hasher.update(data)

            await self._copy_published(sink, end)
            self._extent = end
        else:
            if self._spool is None:
                self._spool = await bridge.local(self._open_spool)
            fd = self._spool
            await bridge.local(os.ftruncate, fd, 0)
            await self._copy_published(lambda off, data: os.pwrite(fd, data, off), end)
            self._hw = end
            self._sequential = False if self._streamed else self._sequential
            if self._hw:
                self._start_stream()
        self._seeded = True

    # ---------------------------------------------------------------- operations
    @property
    def lost(self) -> bool:
        """The pending bytes are gone or unknown (a write or a direct publish failed, or the
        writer cancelled): no later write can make them whole again."""
        return self.cancelled or self.poisoned is not None

    @property
    def doomed(self) -> bool:
        """These pending bytes will never be published (``lost``, or the publish failed):
        stat must show the published image, not them. The kernel sends release after close()
        has returned, so a reader may ask before the writer is gone."""
        return self.lost or (self.dirty and self.publish_error is not None)

    def _not_cancelled(self) -> None:
        if self.cancelled:
            raise BackendError(f"{self.store.id}/{self.name}: pending image was discarded")

    async def write(self, offset: int, data: bytes) -> int:
        async with self._lock:
            self._not_cancelled()
            await self._ensure_seeded()
            end = offset + len(data)
            try:
                if self.direct:
                    await self._write_direct(offset, data)
                else:
                    await self._write_spool(offset, data)
            except BaseException as e:
                self.poisoned = self.poisoned or e
                raise
            self.size = max(self.size, end)
            self.dirty = True
            self.publish_error = None
            return len(data)

    async def _write_direct(self, offset: int, data: bytes) -> None:
        if self._upload is None:
            self._upload = await self._new_upload()
        if offset >= self._extent and _all_zero(data):
            return  # a hole: publishing sets the size, nothing is allocated
        up, h = self._upload, self._hasher
        in_order = self._hash_ok and offset >= h.offset and offset >= self._extent
        if in_order and offset - h.offset > self.settings.hash_inline_max:
            in_order = False  # a hole too big to hash here: the image is hashed later

        def put() -> None:
            up.write(offset, data)
            if in_order:
                h.update_zeros(offset - h.offset)
                h.update(data)

        await bridge.call(self.store, put)
        if not in_order:
            self._hash_ok = False
        self._extent = max(self._extent, offset + len(data))

    def _refuse_trimmed(self, what: str, offset: int) -> None:
        """After trimming, only writes at the end can keep the image whole."""
        if self._trimmed:
            log.error("%s/%s: %s at offset %d, but the first %d bytes were already uploaded "
                      "and dropped from the local spool (cache.spool_trim_after); this image "
                      "cannot be completed", self.store.id, self.name, what, offset,
                      self._trimmed)
            raise BackendError(f"{self.store.id}/{self.name}: {what} before the end of a "
                               f"streamed upload whose spool was trimmed")

    async def _write_spool(self, offset: int, data: bytes) -> None:
        if self._spool is None:
            self._spool = await bridge.local(self._open_spool)
        if offset < self._hw:
            self._refuse_trimmed("write", offset)
            self._sequential = False
        await bridge.local(os.pwrite, self._spool, data, offset)
        self._hw = max(self._hw, offset + len(data))
        if self._sequential:
            self._start_stream()
            self._wake.set()

    async def read(self, offset: int, size: int) -> bytes:
        """What this handle wrote (or the seeded bytes), for O_RDWR users such as qemu-img."""
        async with self._lock:
            if self.lost:
                raise BackendError(f"{self.store.id}/{self.name}: pending bytes discarded or "
                                   f"unknown after a failure ({self.poisoned})")
            if not self._seeded and self.base is not None:
                return await bridge.call(self.store, self.store.read_range, self.base.name,
                                         self.base.version, offset,
                                         max(0, min(size, self.base.size - offset)))
            if offset >= self.size:
                return b""
            size = min(size, self.size - offset)
            if self.direct:
                if self._upload is None:
                    return bytes(size)
                data = await bridge.call(self.store, self._upload.read, offset, size)
            else:
                if offset < self._trimmed:
                    self._refuse_trimmed("read", offset)
                data = await bridge.local(os.pread, self._spool, size, offset)
                if offset < self._trimmed:  # the stream trimmed it while we read
                    self._refuse_trimmed("read", offset)
            return data + bytes(size - len(data))

    async def truncate(self, size: int) -> None:
        async with self._lock:
            self._not_cancelled()
            try:
                await self._truncate(size)
            except BaseException as e:
                self.poisoned = self.poisoned or e
                raise

    async def _truncate(self, size: int) -> None:
        await self._ensure_seeded(upto=size)
        if self.direct:
            if self._upload is None:
                self._upload = await self._new_upload()
            await bridge.call(self.store, self._upload.truncate, size)
            self._extent = min(self._extent, size)
            if size < self._hasher.offset:
                self._hash_ok = False
        else:
            if self._spool is None:
                self._spool = await bridge.local(self._open_spool)
            if size < self._hw:
                self._refuse_trimmed("truncate", size)
                self._sequential = False
                self._hw = size
            await bridge.local(os.ftruncate, self._spool, size)
        self.size = size
        self.dirty = True
        self.publish_error = None

    # ---------------------------------------------------------------- streaming (spool mode)
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

    async def sync(self) -> None:
        """fsync: written bytes reach the backend (still unpublished); upload errors surface.

        Publishing here would show half-written images: qemu-img flushes many times mid-way.
        """
        async with self._lock:
            if self.direct:
                if self._upload is not None:
                    await bridge.call(self.store, self._upload.flush)
                return
            if self._sequential and self._stream_error is None and self._stream_running:
                while self._streamed < self._hw and self._stream_running:
                    await trio.sleep(0.01)
            if self._stream_error is not None:
                raise BackendError(f"{self.store.id}/{self.name}: upload failed: "
                                   f"{self._stream_error}")

    # ---------------------------------------------------------------- publish
    def _meta(self) -> dict[str, str]:
        return {META_MTIME: repr(self.mtime if self.mtime is not None else time.time()),
                META_MODE: f"{self.mode & 0o7777:o}", **self.owner}

    async def publish(self) -> ImageInfo | None:
        """Make the written bytes the image's content; None when there was nothing to publish."""
        async with self._lock:
            if not self.dirty or self.cancelled:
                return None
            if self.poisoned is not None:
                raise BackendError(f"{self.store.id}/{self.name}: not published: an earlier "
                                   f"write failed ({self.poisoned})")
            await self._ensure_seeded()
            meta = self._meta()
            try:
                if self.direct:
                    info = await self._publish_direct(meta)
                else:
                    info = await self._publish_spool(meta)
            except BaseException as e:
                self.publish_error = e
                if self.direct:
                    # The upload holding the written bytes was aborted: a later write would
                    # start an empty one and publish zeros where these bytes were.
                    self.poisoned = self.poisoned or e
                raise
            self.base = self.published = info
            self.dirty = False
            self.mtime = None
            if self.direct:
                self._seeded = False  # the upload is spent; a later change starts from `info`
                self._extent = 0
            elif self._trimmed:
                # The spool lost its head: a later change starts again from `info`.
                self._seeded = False
                self._trimmed = 0
                self._sequential = True
                self._streamed = 0
            else:
                self._sequential = False  # the spool has it all; a later change re-uploads
            return info

    async def _publish_direct(self, meta: dict[str, str]) -> ImageInfo:
        if self._upload is None:
            self._upload = await self._new_upload()
        up, size, h = self._upload, self.size, self._hasher
        hash_ok = self._hash_ok

        in_order = hash_ok and h.offset <= size
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
            self._upload = None
            await self._abort_quietly(up)
            raise
        self._upload = None
        self._hasher = ImageHasher(self.settings.hash_algo)
        self._hash_ok = True
        return info

    async def _publish_spool(self, meta: dict[str, str]) -> ImageInfo:
        if self._spool is None:
            self._spool = await bridge.local(self._open_spool)
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
        try:
            info = await bridge.call(self.store, up.commit, {**meta, **hasher.meta()},
                                     timeout=self._long())
        except BaseException:
            await self._abort_quietly(up)
            self._sequential = False
            raise
        self._hasher = ImageHasher(self.settings.hash_algo)
        return info

    async def _abort_quietly(self, up: Upload) -> None:
        with trio.CancelScope(shield=True):
            try:
                await bridge.call(self.store, up.abort)
            except Exception as e:
                log.warning("%s/%s: could not abort upload: %s", self.store.id, self.name, e)

    async def cancel(self) -> None:
        """Drop the pending new version now, on the writer's request; the published image
        (if any) stays as it was, and the handles still open publish nothing."""
        self.cancelled = True
        self.dirty = False
        await self.discard()

    async def discard(self) -> None:
        """Throw away everything unpublished (release without publish, unmount)."""
        async with self._lock:
            await self._stop_stream()
            for up in (self._upload, self._stream_upload):
                if up is not None:
                    await self._abort_quietly(up)
            self._upload = self._stream_upload = None
            if self._spool is not None:
                os.close(self._spool)
                self._spool = None
