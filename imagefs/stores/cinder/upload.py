"""An image being written into a hidden Cinder volume (see the package docstring, "Uploads")."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from imagefs.stores.base import (
    BackendError,
    ImageInfo,
    StoreError,
    Upload,
    meta_mode,
    meta_mtime,
    user_meta,
)
from imagefs.stores.cinder.api import MV_EXTEND_ATTACHED
from imagefs.stores.cinder.rbdio import close_image, rbd_error

if TYPE_CHECKING:
    from imagefs.stores.cinder import CinderStore

log = logging.getLogger(__name__)

GiB = 1 << 30
#: A call on an upload that ends later than this fraction of its deadline may have been
#: abandoned by the bridge (its caller got EIO): its effects must not count.
LATE_FRACTION = 0.9


def gib_for(size: int) -> int:
    """Whole GiB a volume needs for ``size`` bytes (at least 1: Cinder has no empty volumes)."""
    return max(1, -(-size // GiB))


def _all_zero(data: bytes) -> bool:
    return data[0] == 0 and data[-1] == 0 and data.count(0) == len(data)


class CinderUpload(Upload):
    """A hidden volume ``.imagefs-<owner id>``, attached read-write and written with librbd.

    The volume is created with the size hint (whole GiB) and grows by ``os-extend`` while
    attached (microversion 3.42) whenever a write or truncate passes its end; volumes never
    shrink, so it grows to exactly the GiB the bytes need, never ahead. The logical size is the
    last truncate or the end of the furthest write, published as ``image_size``.

    Every librbd and Cinder call of an upload runs under ``_mutex``: the bridge abandons calls
    that pass their deadline, and a write racing an extend or the commit on one Image must not
    happen. A call that fails, or ends after its deadline, marks the upload dead: it is never
    published. ``abort`` marks it dead at once; whoever holds the mutex then removes the volume.
    """

    def __init__(self, store: CinderStore, name: str, size_hint: int | None) -> None:
        self.store = store
        self.name = name
        self.tmp = store.hidden_name()
        #: The hidden volume; None once published or removed: nothing left to clean up.
        self.vid: str | None = None
        self.attachment: str | None = None
        self.image: Any = None
        self.size = 0
        self.capacity = gib_for(size_hint or 0) * GiB
        self.created = time.time()
        self.dead = False
        self.aborting = False
        self._mutex = threading.Lock()
        deadline = time.monotonic() + store.wait_budget()
        try:
            spare = store.take_spare()
            if spare is not None:  # made and attached ahead, while the last upload ran
                self.tmp, self.vid, self.created, self.attachment, spec = spare
            else:
                self.vid, self.created = store.create_volume(
                    self.tmp, self.capacity // GiB, deadline)
                self.attachment, spec = store.attach(self.vid, "rw", deadline)
            store.prepare_spare()
            self.image = store.rbdio.open(spec, read_only=False)
            # librbd stays writethrough until it sees a flush (rbd_cache_writethrough_until_
            # flush): an empty one now makes FUSE's small writes coalesce in its cache.
            self.image.flush()
            self.capacity = int(self.image.size())
            self._grow(self.image, size_hint or 0)
        except BaseException:
            self.dead = True
            self._discard()
            raise

    def _what(self) -> str:
        return f"{self.store.id}/{self.name}"

    @contextlib.contextmanager
    def _locked(self, what: str, deadline: float | None) -> Iterator[Any]:
        """The Image, under the mutex, for one call; a failure or a late end kills the upload."""
        t0 = time.monotonic()
        if not self._mutex.acquire(timeout=self.store.lock_wait()):
            self.dead = True
            raise BackendError(f"{self._what()}: {what}: an earlier call on this upload is "
                               "still running", retryable=True)
        try:
            if self.dead or self.image is None:
                raise BackendError(f"{self._what()}: {what}: upload already finished or failed")
            try:
                yield self.image
            except BaseException as e:
                self.dead = True
                raise rbd_error(e, f"{self._what()}: {what}") from None
            if deadline is not None and time.monotonic() - t0 > deadline * LATE_FRACTION:
                self.dead = True
                raise BackendError(f"{self._what()}: {what} outlived its deadline",
                                   retryable=True)
        finally:
            try:
                if self.aborting:
                    self._discard()
            finally:
                self._mutex.release()

    def _grow(self, img: Any, end: int) -> None:
        """Extend the attached volume to the GiB ``end`` needs (one os-extend, then wait)."""
        if end <= self.capacity:
            return
        assert self.vid is not None
        gib = gib_for(end)
        store = self.store
        deadline = time.monotonic() + store.wait_budget()
        store.api.request("POST", f"/volumes/{self.vid}/action", MV_EXTEND_ATTACHED,
                          {"os-extend": {"new_size": gib}}, what=f"extending {self.tmp} to "
                          f"{gib} GiB for {self._what()}", ok=(202,))
        store.api.wait_volume(self.vid, lambda v: v.get("status") != "extending"
                              and int(v.get("size") or 0) >= gib, "extending", deadline)
        # librbd refreshes an open image when the header changes; wait until it has.
        while int(img.size()) < gib * GiB:
            if time.monotonic() > deadline:
                raise BackendError(f"{self._what()}: volume extended to {gib} GiB, but the "
                                   f"RBD image still has {img.size()} bytes", retryable=True)
            time.sleep(0.02)
        self.capacity = gib * GiB

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        end = offset + len(data)
        with self._locked(f"write at {offset}", self.store.timeout) as img:
            self._grow(img, end)
            if _all_zero(data):
                img.write_zeroes(offset, len(data))  # allocates nothing where nothing is
            else:
                n = img.write(data, offset)
                if n != len(data):
                    raise BackendError(f"short write: {n} of {len(data)} bytes")
        self.size = max(self.size, end)

    def read(self, offset: int, length: int) -> bytes:
        with self._locked(f"read at {offset}", self.store.timeout) as img:
            n = max(0, min(length, self.size - offset))
            data = img.read(offset, n) if n else b""
        return data + bytes(n - len(data))

    def truncate(self, size: int) -> None:
        with self._locked(f"truncate to {size}", self.store.timeout) as img:
            self._grow(img, size)
            if size < self.size:
                # The volume cannot shrink: zero what was cut, so growing again reads zeros.
                img.write_zeroes(size, min(self.size, self.capacity) - size)
            self.size = size

    def flush(self) -> None:
        with self._locked("flush", self.store.timeout) as img:
            img.flush()

    def commit(self, meta: Mapping[str, str]) -> ImageInfo:
        """One PUT gives the volume its name and all its metadata at once; the attachment and
        Image then serve this mount's readers of the new image (no second attach)."""
        store = self.store
        stored = user_meta(meta)
        try:
            with self._locked("publish", None) as img:
                img.flush()
                if self.dead:  # aborted meanwhile (abort marks it without the mutex)
                    raise BackendError(f"{self._what()}: aborted during publish")
                assert self.vid is not None
                vid, self.vid = self.vid, None  # from here on, publish owns the volume
                try:
                    store.publish(vid, self.name, store.volume_meta(self.size, stored))
                except BaseException:
                    self.vid = vid  # not published: abort removes it
                    raise
                assert self.attachment is not None
                store.adopt(vid, self.attachment, img, self.size)
                self.image = self.attachment = None
        except BaseException:
            self.abort()
            raise
        return ImageInfo(name=self.name, size=self.size, mtime=meta_mtime(stored, self.created),
                         mode=meta_mode(stored), version=vid, meta=stored)

    def _discard(self) -> None:
        """Close, detach and delete the hidden volume (best effort: cleanup at next mount)."""
        self.dead = True
        self.aborting = False
        img, self.image = self.image, None
        if img is not None:
            close_image(img)
        aid, self.attachment = self.attachment, None
        if aid is not None:
            self.store.detach(aid)
        vid, self.vid = self.vid, None
        if vid is not None:
            try:
                self.store.delete_volume(vid, wait=False)
            except StoreError as e:
                log.warning("store %s: could not remove upload volume %s (%s): %s; removed at "
                            "next mount", self.store.id, self.tmp, vid, e)

    def abort(self) -> None:
        self.dead = True
        self.aborting = True
        if not self._mutex.acquire(timeout=self.store.lock_wait()):
            log.warning("%s: abort: an earlier call on this upload is still running; its volume "
                        "is removed when that call ends", self._what())
            return
        try:
            if self.aborting:
                self._discard()
        finally:
            self._mutex.release()
