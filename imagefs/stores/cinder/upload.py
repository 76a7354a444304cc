"""An image being written into a hidden Cinder volume, published by one PUT.

A new image goes to a hidden volume ``.imagefs-<owner id>`` (``owners.py``), attached
read-write and extended while attached as bytes arrive (whole GiB: volumes never shrink).
Commit flushes and publishes with one ``PUT /volumes/<id>`` that sets the name and the whole
metadata (``image_size``, mtime, mode, hashes) in one database update (``replace.py``): the
name never shows a volume without its size. The upload's attachment and Image then serve this
mount's readers of the new image (``detach_after`` applies). The volume is usually the one made
ahead while the last upload ran (``spare.py``).

Request pattern: an upload takes the volume made ahead (else create, wait, attach: 1-2 s
here), one extend per GiB grown, and at commit 1-2 listing GETs and the PUT (plus tag and
DELETE when replacing).

The mutex-and-deadline discipline around the librbd Image is the rbd store's
(``imagefs.stores.rbd.upload.ImageUpload``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from imagefs.stores.base import (
    BackendError,
    ImageInfo,
    StoreError,
    meta_mode,
    meta_mtime,
    user_meta,
)
from imagefs.stores.cinder.api import MV_EXTEND_ATTACHED
from imagefs.stores.cinder.volumes import hidden_name
from imagefs.stores.rbd.cluster import rbd_error
from imagefs.stores.rbd.upload import ImageUpload

if TYPE_CHECKING:
    from imagefs.stores.cinder.store import CinderStore

log = logging.getLogger(__name__)

GiB = 1 << 30


def gib_for(size: int) -> int:
    """Whole GiB a volume needs for ``size`` bytes (at least 1: Cinder has no empty volumes)."""
    return max(1, -(-size // GiB))


class CinderUpload(ImageUpload):
    """A hidden volume ``.imagefs-<owner id>``, attached read-write and written with librbd.

    The volume is created with the size hint (whole GiB) and grows by ``os-extend`` while
    attached (microversion 3.42) whenever a write or truncate passes its end; volumes never
    shrink, so it grows to exactly the GiB the bytes need, never ahead. The logical size is the
    last truncate or the end of the furthest write, published as ``image_size``.

    Every librbd and Cinder call of an upload runs under the mutex (``ImageUpload``): a write
    racing an extend or the commit on one Image must not happen.
    """

    KIND = "volume"

    def __init__(self, store: CinderStore, name: str, size_hint: int | None) -> None:
        super().__init__(name, store.timeout)
        self.store = store
        self.tmp = hidden_name()
        #: The hidden volume; None once published or removed: nothing left to clean up.
        self.vid: str | None = None
        self.attachment: str | None = None
        self.capacity = gib_for(size_hint or 0) * GiB
        self.created = time.time()
        deadline = time.monotonic() + store.wait_budget()
        try:
            spare = store.spare.take()
            if spare is not None:  # made and attached ahead, while the last upload ran
                self.tmp, self.vid, self.created, self.attachment, spec = spare
            else:
                self.vid, self.created = store.volumes.create(
                    self.tmp, self.capacity // GiB, deadline)
                self.attachment, spec = store.volumes.attach(self.vid, "rw", deadline)
            store.spare.prepare()
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

    def _lock_wait(self) -> float:
        return self.store.lock_wait()

    def _error(self, e: BaseException, what: str) -> StoreError:
        return rbd_error(e, what)

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
                                   f"RBD image still has {img.size()} bytes")
            time.sleep(0.02)
        self.capacity = gib * GiB

    def truncate(self, size: int) -> None:
        with self._locked(f"truncate to {size}", self.timeout) as img:
            self._grow(img, size)
            if size < self.size:
                # The volume cannot shrink: zero what was cut, so growing again reads zeros.
                img.write_zeroes(size, min(self.size, self.capacity) - size)
            self.size = size

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
                    store.replacer.publish(vid, self.name,
                                           store.layout.volume_meta(self.size, stored))
                except BaseException:
                    self.vid = vid  # not published: abort removes it
                    raise
                assert self.attachment is not None
                store.readers.adopt(vid, self.attachment, img, self.size)
                self.image = self.attachment = None
        except BaseException:
            self.abort()
            raise
        return ImageInfo(name=self.name, size=self.size, mtime=meta_mtime(stored, self.created),
                         mode=meta_mode(stored), version=vid, meta=stored)

    def _discard(self) -> None:
        """Close, detach and delete the hidden volume (best effort: cleanup at next mount)."""
        self._close()
        aid, self.attachment = self.attachment, None
        if aid is not None:
            self.store.volumes.detach(aid)
        vid, self.vid = self.vid, None
        if vid is not None:
            try:
                self.store.volumes.delete(vid, wait=False)
            except StoreError as e:
                log.warning("store %s: could not remove upload volume %s (%s): %s; removed at "
                            "next mount", self.store.id, self.tmp, vid, e)
