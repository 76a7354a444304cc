"""Open-for-write state: where written bytes go until the image is published.

Two strategies, chosen by the store's capabilities, behind the one ``Writer`` interface:

* ``DirectWriter`` (imagefs.writer_direct; stores with ``Capability.RANDOM_WRITE``: file,
  rbd, cinder): writes go straight into the store's hidden upload at any offset.
* ``SpoolWriter`` (imagefs.writer_spool; s3, swift): writes land in a local spool file that a
  background task streams to the store while the writes stay sequential.

Publishing (flush, fsync, release) is the only moment an image becomes visible under its name.
An image opened for writing without O_TRUNC is seeded with its published bytes on the first
change, so partial rewrites keep the rest. Hashes (Glance multihash + md5) are computed on the
bytes as they stream whenever they arrive in order, otherwise in the single pass that publishes.

What happens to the pending bytes is ``Writer.state`` (see ``WriterState``); whether there
are any is ``Writer.dirty``. The two are apart because a writer whose first write failed has
nothing to publish *and* content it can never publish.
"""

from __future__ import annotations

import enum
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
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
    ImageInfo,
    Store,
    Upload,
)
from imagefs.upload_queue import Budget

log = logging.getLogger(__name__)

CHUNK = 4 << 20


@dataclass(frozen=True)
class WriterSettings:
    spool_dir: Path
    hash_algo: str
    #: Multiplier of the store timeout for calls that move a whole image (commit, full upload).
    commit_timeout_factor: float = 20.0
    #: See imagefs.writer_spool; 0 never trims.
    spool_trim_after: int = 0
    #: Plus one second per this many bytes: a 300 GiB image may take longer than any fixed
    #: deadline, yet a stalled backend must still end in EIO (each request has its own timeout).
    commit_min_rate: int = 4 << 20
    #: Hashing a close may still do (bytes that did not stream through the hasher in order,
    #: holes included). Past it the image is published without hashes and the mount hashes it
    #: in the background (``Publisher.published``, ``background_hash``): ``qemu-img create
    #: -f raw IMG 1T`` must not sit in close() hashing a terabyte of zeros.
    hash_inline_max: int = 64 << 20
    #: Images published without hashes up to this size are hashed in the background.
    hash_background_max: int = 64 << 30
    #: The bytes every writer of the mount may have queued, written but not yet in the
    #: store (``cache.max_write_behind``, imagefs.upload_queue): one per mount, as its
    #: WriterSettings.
    write_budget: Budget = field(default_factory=lambda: Budget(16 << 20), compare=False)

    def long_timeout(self, store: Store, size: int) -> float:
        """Deadline of a call that moves ``size`` bytes at once (publish, server-side copy)."""
        return store.timeout * self.commit_timeout_factor + size / self.commit_min_rate


class WriterState(enum.Enum):
    """The fate of a writer's pending bytes (``Writer.error`` says why when it is not OPEN)."""

    #: Writes are taken; the last close publishes what is pending.
    OPEN = "open"
    #: The last publish failed (``error``); the pending bytes are kept and the last close does
    #: not retry (it would fail the same way); the next write or truncate makes it OPEN again.
    PUBLISH_FAILED = "publish failed"
    #: A write or truncate failed (or timed out, its thread possibly still running), or a
    #: publish failed after the bytes it held were dropped: the pending content is unknown and
    #: is never published. A new open starts a new writer.
    LOST = "lost"
    #: Dropped on the writer's request (``user.imagefs.discard``): nothing is published and
    #: later writes fail.
    CANCELLED = "cancelled"


class Writer(ABC):
    """The pending new version of one image, shared by the handles that write it.

    The public methods take the lock and keep the state; subclasses say where bytes go
    (the ``_``-prefixed abstract methods, each called under the lock)."""

    #: A failed publish took the written bytes with it (the upload holding them was aborted):
    #: the writer is LOST, else a later write would start an empty upload and publish zeros
    #: where these bytes were.
    PUBLISH_FAILURE_LOSES_BYTES = False

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
        #: Changes since the last publish (or since an open without O_TRUNC) wait to be
        #: published; a new or truncated image is dirty from the start.
        self.dirty = base is None
        self.size = base.size if base else 0
        self.published: ImageInfo | None = None
        self.state = WriterState.OPEN
        #: Why the state is not OPEN (the first failure that made it LOST).
        self.error: BaseException | None = None
        #: Made for one operation (truncate(2) on a path): no handle may join it.
        self.private = False
        #: The last handle's release has begun (publish, then discard): no handle may join
        #: this writer any more, its bytes are being published or dropped. An open arriving
        #: meanwhile waits for ``closed`` and starts from what the release published.
        self.closing = False
        self.closed = trio.Event()
        self._seeded = base is None
        self._lock = trio.Lock()
        self._hasher = ImageHasher(settings.hash_algo)

    # ---------------------------------------------------------------- what fs asks
    @property
    def lost(self) -> bool:
        """The pending bytes are gone or unknown: no later write can make them whole again."""
        return self.state in (WriterState.LOST, WriterState.CANCELLED)

    @property
    def doomed(self) -> bool:
        """These pending bytes will never be published (``lost``, or the publish failed):
        stat must show the published image, not them. The kernel sends release after close()
        has returned, so a reader may ask before the writer is gone."""
        return self.lost or (self.dirty and self.state is WriterState.PUBLISH_FAILED)

    @property
    def name_shows_image(self) -> bool:
        """A published image is behind the name: one was there when this writer began, or
        this writer published one. Otherwise the image is new and invisible to others."""
        return self.existed or self.published is not None

    @property
    def holds_attributes(self) -> bool:
        """chmod, utime and chown go to the writer (published with its bytes), not to a
        published image: it has changes pending, or never published anything."""
        return self.dirty or self.published is None

    @property
    def shows_own_attributes(self) -> bool:
        """stat shows the writer's size, mode and times rather than a published image's."""
        return self.dirty or (self.published is None and self.base is None)

    # ---------------------------------------------------------------- state changes
    def _lose(self, e: BaseException) -> None:
        """A failed write or truncate: the pending image can no longer be published. A
        writer cancelled meanwhile (``user.imagefs.discard``) stays cancelled, so later
        writes are still refused."""
        if self.state in (WriterState.OPEN, WriterState.PUBLISH_FAILED):
            self.state, self.error = WriterState.LOST, e

    def _changed(self, size: int) -> None:
        """A write or truncate succeeded: there is something new to publish."""
        self.size = size
        self.dirty = True
        if self.state is WriterState.PUBLISH_FAILED:
            self.state, self.error = WriterState.OPEN, None

    def _not_cancelled(self) -> None:
        if self.state is WriterState.CANCELLED:
            raise BackendError(f"{self.store.id}/{self.name}: pending image was discarded")

    # ---------------------------------------------------------------- helpers
    def _long(self) -> float:
        return self.settings.long_timeout(self.store, self.size)

    async def _new_upload(self) -> Upload:
        return await bridge.call(self.store, self.store.upload, self.name, self.size or None)

    async def _copy_published(self, sink: Callable[[int, bytes], None], end: int,
                              sink_is_store: bool) -> None:
        """Feed the published bytes of ``base`` below ``end`` to ``sink`` in order; a sink
        that writes to the store runs under the store's deadline, a local one does not."""
        base = self.base
        assert base is not None
        for off in range(0, end, CHUNK):
            n = min(CHUNK, end - off)
            data = await bridge.call(self.store, self.store.read_range, base.name, base.version,
                                     off, n)
            if len(data) != n:
                raise BackendError(f"{self.store.id}/{base.name}: short read while seeding")
            if sink_is_store:
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
        await self._seed(end)
        self._seeded = True

    def _meta(self) -> dict[str, str]:
        return {META_MTIME: repr(self.mtime if self.mtime is not None else time.time()),
                META_MODE: f"{self.mode & 0o7777:o}", **self.owner}

    async def _abort_quietly(self, up: Upload) -> None:
        with trio.CancelScope(shield=True):
            try:
                await bridge.call(self.store, up.abort)
            except Exception as e:
                log.warning("%s/%s: could not abort upload: %s", self.store.id, self.name, e)

    # ---------------------------------------------------------------- operations
    async def write(self, offset: int, data: bytes) -> int:
        async with self._lock:
            self._not_cancelled()
            await self._ensure_seeded()
            try:
                await self._write(offset, data)
            except BaseException as e:
                self._lose(e)
                raise
            self._changed(max(self.size, offset + len(data)))
            return len(data)

    async def read(self, offset: int, size: int) -> bytes:
        """What this handle wrote (or the seeded bytes), for O_RDWR users such as qemu-img."""
        async with self._lock:
            if self.lost:
                raise BackendError(f"{self.store.id}/{self.name}: pending bytes discarded or "
                                   f"unknown after a failure ({self.error})")
            if not self._seeded and self.base is not None:
                return await bridge.call(self.store, self.store.read_range, self.base.name,
                                         self.base.version, offset,
                                         max(0, min(size, self.base.size - offset)))
            if offset >= self.size:
                return b""
            size = min(size, self.size - offset)
            data = await self._read(offset, size)
            return data + bytes(size - len(data))

    async def truncate(self, size: int) -> None:
        async with self._lock:
            self._not_cancelled()
            try:
                await self._ensure_seeded(upto=size)
                await self._truncate(size)
            except BaseException as e:
                self._lose(e)
                raise
            self._changed(size)

    async def sync(self) -> None:
        """fsync: written bytes reach the backend (still unpublished); upload errors surface.

        Publishing here would show half-written images: qemu-img flushes many times mid-way.
        """
        async with self._lock:
            await self._sync()

    async def publish(self) -> ImageInfo | None:
        """Make the written bytes the image's content; None when there was nothing to publish."""
        async with self._lock:
            if not self.dirty or self.state is WriterState.CANCELLED:
                return None
            if self.state is WriterState.LOST:
                raise BackendError(f"{self.store.id}/{self.name}: not published: an earlier "
                                   f"write failed ({self.error})")
            await self._ensure_seeded()
            try:
                info = await self._publish(self._meta())
            except BaseException as e:
                if self.PUBLISH_FAILURE_LOSES_BYTES:
                    self._lose(e)
                else:
                    self.state, self.error = WriterState.PUBLISH_FAILED, e
                raise
            self.base = self.published = info
            self.dirty = False
            self.mtime = None
            self.state, self.error = WriterState.OPEN, None
            self._hasher = ImageHasher(self.settings.hash_algo)
            self._after_publish()
            return info

    async def cancel(self) -> None:
        """Drop the pending new version now, on the writer's request; the published image
        (if any) stays as it was, and the handles still open publish nothing."""
        self.state = WriterState.CANCELLED
        self.dirty = False
        await self.discard()

    async def discard(self) -> None:
        """Throw away everything unpublished (release without publish, unmount)."""
        async with self._lock:
            await self._discard()

    # ---------------------------------------------------------------- the strategy
    @abstractmethod
    async def _seed(self, end: int) -> None:
        """Make the first ``end`` published bytes the pending image's start."""

    @abstractmethod
    async def _write(self, offset: int, data: bytes) -> None: ...

    @abstractmethod
    async def _read(self, offset: int, size: int) -> bytes:
        """Pending bytes within the pending size (a short result reads as zeros)."""

    @abstractmethod
    async def _truncate(self, size: int) -> None:
        """Called seeded up to ``size``."""

    @abstractmethod
    async def _sync(self) -> None: ...

    @abstractmethod
    async def _publish(self, meta: dict[str, str]) -> ImageInfo:
        """Upload and commit what is pending with ``meta`` (hashes added when known)."""

    @abstractmethod
    def _after_publish(self) -> None:
        """A publish succeeded: what a later change must start from."""

    @abstractmethod
    async def _discard(self) -> None: ...
