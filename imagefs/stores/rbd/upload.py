"""An upload: a hidden RBD image written in place, published by a rename.

An upload is a hidden image ``.imagefs-<owner id>`` (see ``layout.py``) created in the pool at
open and written in place at any offset (``Capability.RANDOM_WRITE``: the writer goes
direct, ``writer_direct.py``, and never spools). The image grows geometrically ahead of the
writes (a resize is a header update, not free) and is resized to the exact logical size at
commit. librbd's cache is switched to writeback at once (an empty flush), so FUSE's small
writes coalesce. All-zero writes become
``write_zeroes``, which allocates nothing on objects that do not exist yet: sparse images stay
sparse. Commit sets metadata, flushes, (glance_layout) creates and protects snapshot ``snap``,
then renames the image to its final name (``replace.py``): the name only ever shows a complete
image, with its snapshot already there. The published size is the last ``truncate``
(``writer_direct.py`` always sends one before commit) or the end of the furthest write.

The bridge abandons calls that pass their deadline, so a call on an upload may still run when
the next arrives. Every librbd call of an upload runs under its mutex (waits bounded below the
store timeout); a call that fails or ends after its deadline marks the upload dead, and every
later call raises ``BackendError``. ``abort`` marks it dead at once (a commit checks that just
before its rename) and removes the hidden image only while ``rbd_id.<hidden name>`` still
names this upload's image: a published image is never touched by its hidden name.

``ImageUpload`` is that mutex-and-deadline discipline around one librbd ``Image``; the cinder
store's uploads (a hidden volume written with librbd) are built on it too.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from abc import abstractmethod
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from imagefs.stores.base import (
    BackendError,
    ImageInfo,
    NotFound,
    StoreError,
    Upload,
    meta_mode,
    meta_mtime,
    user_meta,
)
from imagefs.stores.rbd.cluster import close_image
from imagefs.stores.rbd.layout import META_PREFIX, SNAP, timestamp, upload_name

if TYPE_CHECKING:
    from imagefs.stores.rbd.store import RbdStore

log = logging.getLogger(__name__)

MiB = 1 << 20
#: Uploads grow ahead of the writes by doubling, at most this much at a time.
GROW_MAX = 1 << 30
GROW_ALIGN = 4 * MiB
#: An upload call that ends later than this fraction of its deadline was (or may have been)
#: abandoned by the bridge: its effects must not count.
LATE_FRACTION = 0.9


def all_zero(data: bytes) -> bool:
    return data[0] == 0 and data[-1] == 0 and data.count(0) == len(data)


class ImageUpload(Upload):
    """An upload written through one librbd ``Image``, every call under ``_mutex``.

    The bridge abandons a call that passes its deadline, so a write may still run while the
    next call (truncate, commit, abort) arrives, and librbd does not survive a resize racing a
    write on one Image. Waits for the mutex are bounded below the store timeout. A call that
    fails, or that finishes after its deadline (its thread was abandoned), marks the upload
    ``dead``: every later call raises ``BackendError``, so bytes of unknown state are never
    published. ``abort`` marks it dead without waiting; if the mutex stays busy, the call
    holding it cleans up (``_discard``) when it ends.
    """

    #: What the upload writes into, for log lines.
    KIND = "image"

    def __init__(self, name: str, timeout: float) -> None:
        self.name = name
        self.timeout = timeout
        self.size = 0  # the logical size: what commit publishes
        self.capacity = 0  # the image's actual size (subclasses set it)
        self.image: Any = None
        #: Set by abort, by a failed call and by a call that outlived its deadline.
        self.dead = False
        #: abort() ran (or is waiting): whoever holds the mutex last discards the upload.
        self.aborting = False
        self._mutex = threading.Lock()

    @abstractmethod
    def _what(self) -> str: ...

    @abstractmethod
    def _lock_wait(self) -> float:
        """How long a call waits for the mutex (below the bridge's deadline)."""

    @abstractmethod
    def _error(self, e: BaseException, what: str) -> StoreError:
        """A librbd exception → the store error."""

    @abstractmethod
    def _grow(self, img: Any, end: int) -> None:
        """Make room for ``end`` bytes (under the mutex)."""

    @abstractmethod
    def _discard(self) -> None:
        """Mark dead, close the Image and remove what was written (under the mutex)."""

    def _close(self) -> None:
        """The first part of every ``_discard``: dead for good, and the Image closed."""
        self.dead = True
        self.aborting = False
        img, self.image = self.image, None
        if img is not None:
            close_image(img)

    @contextlib.contextmanager
    def _locked(self, what: str, deadline: float | None) -> Iterator[Any]:
        """The Image, under the mutex, for one call; any failure kills the upload.

        ``deadline`` is the caller's bridge deadline in seconds (None: not bounded here); a
        call that ends after it was abandoned by the bridge, so its effects must not count.
        """
        t0 = time.monotonic()
        if not self._mutex.acquire(timeout=self._lock_wait()):
            self.dead = True
            raise BackendError(f"{self._what()}: {what}: an earlier call on this upload is "
                               "still running")
        try:
            if self.dead or self.image is None:
                raise BackendError(f"{self._what()}: {what}: upload already finished or failed")
            try:
                yield self.image
            except BaseException as e:
                self.dead = True
                raise self._error(e, f"{self._what()}: {what}") from None
            if deadline is not None and time.monotonic() - t0 > deadline * LATE_FRACTION:
                self.dead = True
                raise BackendError(f"{self._what()}: {what} outlived its deadline")
        finally:
            try:
                if self.aborting:
                    self._discard()
            finally:
                self._mutex.release()

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        end = offset + len(data)
        with self._locked(f"write at {offset}", self.timeout) as img:
            self._grow(img, end)
            if all_zero(data):
                img.write_zeroes(offset, len(data))  # allocates nothing where nothing is
            else:
                n = img.write(data, offset)
                if n != len(data):
                    raise BackendError(f"short write: {n} of {len(data)} bytes")
        self.size = max(self.size, end)  # only reached if the call counted (see _locked)

    def read(self, offset: int, length: int) -> bytes:
        with self._locked(f"read at {offset}", self.timeout) as img:
            n = max(0, min(length, self.size - offset))
            data = img.read(offset, n) if n else b""
        return data + bytes(n - len(data))

    def flush(self) -> None:
        with self._locked("flush", self.timeout) as img:
            img.flush()

    def abort(self) -> None:
        self.dead = True
        self.aborting = True
        if not self._mutex.acquire(timeout=self._lock_wait()):
            # The call holding the mutex sees ``aborting`` when it ends and cleans up then.
            log.warning("%s: abort: an earlier call on this upload is still running; its %s "
                        "is removed when that call ends", self._what(), self.KIND)
            return
        try:
            if self.aborting:
                self._discard()
        finally:
            self._mutex.release()


class RbdUpload(ImageUpload):
    """A hidden image being written; becomes visible only in ``commit``."""

    def __init__(self, store: RbdStore, name: str, size_hint: int | None) -> None:
        super().__init__(name, store.timeout)
        self.store = store
        client = store.client
        tmp = upload_name()
        #: The hidden image's name; None once published (or removed): nothing left to clean.
        self.tmp: str | None = tmp
        self.capacity = size_hint or 0  # ahead of ``size`` on growth
        self.image_id = ""
        try:
            client.rbd.RBD().create(client.conn(), tmp, self.capacity)
        except Exception as e:
            raise client.err(e, f"{store.id}: cannot create upload image for {name}") from None
        try:
            self.image = client.rbd.Image(client.conn(), tmp)
            self.image_id = self.image.id()
            # librbd keeps its cache writethrough until the first flush it sees
            # (rbd_cache_writethrough_until_flush): FUSE hands over 128 KiB writes, each then a
            # synchronous OSD round trip. An empty flush now switches to writeback; commit
            # flushes before the image gets its name, so nothing unflushed is ever published.
            self.image.flush()
        except Exception as e:
            self.dead = True
            if self.image is not None:
                close_image(self.image)
                self.image = None
            if self.image_id:
                self._remove_tmp()
            else:  # opened nothing: the name can only be ours (it has a random part)
                try:
                    store.replacer.remove(tmp)
                except StoreError as e2:
                    log.warning("%s: could not remove upload image %s: %s", store.id, tmp, e2)
            raise client.err(e, f"{store.id}: cannot open upload image for {name}") from None

    def _what(self) -> str:
        return f"{self.store.id}/{self.name}"

    def _lock_wait(self) -> float:
        return self.store.client.lock_wait()

    def _error(self, e: BaseException, what: str) -> StoreError:
        return self.store.client.err(e, what)

    def _grow(self, img: Any, end: int) -> None:
        """Make the image at least ``end`` bytes; never shrinks it."""
        if end <= self.capacity:
            return
        want = max(end, self.capacity + min(self.capacity, GROW_MAX))
        want = -(-want // GROW_ALIGN) * GROW_ALIGN
        want = max(want, img.size())
        img.resize(want)
        self.capacity = want

    def truncate(self, size: int) -> None:
        with self._locked(f"truncate to {size}", self.timeout) as img:
            if size < self.capacity:
                # Shrinking drops the bytes past ``size``; growing later reads zeros there.
                img.resize(size)
                self.capacity = size
            else:
                self._grow(img, size)
            self.size = size

    def commit(self, meta: Mapping[str, str]) -> ImageInfo:
        store = self.store
        stored = user_meta(meta)
        try:
            with self._locked("publish", None) as img:
                if self.capacity != self.size:
                    img.resize(self.size)
                    self.capacity = self.size
                for key, value in stored.items():
                    img.metadata_set(META_PREFIX + key, value)
                img.flush()
                if store.opts.glance_layout:
                    img.create_snap(SNAP)
                    img.protect_snap(SNAP)
                created = timestamp(img.create_timestamp())
                self.image = None
                close_image(img)
                if self.dead:  # aborted meanwhile (abort does not wait for the mutex to mark it)
                    raise BackendError(f"{self._what()}: aborted during publish")
                assert self.tmp is not None
                tmp, self.tmp = self.tmp, None  # from here on, never touched by that name
                try:
                    store.replacer.publish(tmp, self.name, self.image_id)
                except BaseException:
                    self.tmp = tmp  # not published: _remove_tmp checks the id before removing
                    raise
        except BaseException:
            self.abort()
            raise
        info = ImageInfo(name=self.name, size=self.size, mtime=meta_mtime(stored, created),
                         mode=meta_mode(stored), version=self.image_id, meta=stored)
        store.facts.remember(info, has_snap=store.opts.glance_layout)
        return info

    def _remove_tmp(self) -> None:
        """Remove the upload image, only if its name still refers to this upload's image."""
        tmp, self.tmp = self.tmp, None
        if tmp is None:
            return
        store = self.store
        try:
            if self.image_id and store.client.image_id(tmp) != self.image_id:
                log.warning("%s: %s no longer names this upload's image: not removing it",
                            store.id, tmp)
                return
            store.replacer.remove(tmp)
        except NotFound:
            pass
        except StoreError as e:
            log.warning("%s: could not remove upload image %s: %s (removed at next mount)",
                        store.id, tmp, e)

    def _discard(self) -> None:
        self._close()
        self._remove_tmp()
