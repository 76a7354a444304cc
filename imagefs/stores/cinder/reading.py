"""Reading published volumes: one attachment and read-only Image per volume, shared.

Reads attach the volume (``volumes.py``: mode ``ro``) and open its RBD image with librbd
(``rbdio.py``); one attachment and one Image per volume serve all readers of this mount, and
are dropped after ``detach_after`` idle seconds. While attached, Cinder refuses to delete the
volume, so the bytes read are that version's. A volume that is not multiattach can have one
attachment at a time: a second host reading the same image meanwhile gets EBUSY (Glance's own
readers have the same limit; a multiattach ``volume_type`` lifts it), unless the store knows the
volume's RBD image without attaching (``rbd_pool``, or a pool this mount saw in a
connection_info): it then reads it read-only without an attachment, and since nothing of ours
then keeps the volume from being deleted, checks after every read that
``rbd_id.volume-<id>`` still names the image it opened (librbd reads zeros from a removed
image): those bytes or EIO. Only RBD-backed volumes can be read or written: any other
``driver_volume_type`` is EOPNOTSUPP with a message naming it.

Request pattern: a read of an attached volume is one librbd read; the first read of a volume
costs a GET and two attachment calls (create, complete); idle detach is one DELETE.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from imagefs.stores.base import BackendError, Busy, Changed, NotFound
from imagefs.stores.cinder.api import CinderApi
from imagefs.stores.cinder.layout import Layout
from imagefs.stores.cinder.rbdio import RbdAccess
from imagefs.stores.cinder.volumes import Volumes
from imagefs.stores.keylocks import KeyLocks
from imagefs.stores.rbd.cluster import close_image, rbd_error

log = logging.getLogger(__name__)


@dataclass
class _ReadHandle:
    """One attachment and read-only Image of a volume, shared by this mount's readers."""

    vid: str
    #: None: opened without an attachment (the volume is attached elsewhere); every read is
    #: then checked against ``rbd_id`` (see ``read``).
    attachment: str | None
    image: Any
    size: int
    refs: int = 0
    last_used: float = 0.0
    doomed: bool = False
    spec: tuple[str, str, str] = ("", "", "")
    image_id: str = ""


class Readers:
    """The read handles of one store; ``lock`` is the store's lock, ``stop`` its closing
    event, ``lock_wait()`` how long a call waits for another."""

    def __init__(self, store_id: str, api: CinderApi, rbdio: RbdAccess, volumes: Volumes,
                 layout: Layout, rbd_pool: str, lock: threading.Lock, stop: threading.Event,
                 lock_wait: Callable[[], float]) -> None:
        self.store_id = store_id
        self.api = api
        self.rbdio = rbdio
        self.volumes = volumes
        self.layout = layout
        self.rbd_pool = rbd_pool
        self._lock = lock
        self._stop = stop
        self.lock_wait = lock_wait
        self._handles: dict[str, _ReadHandle] = {}
        self._attach_locks = KeyLocks(lock)
        #: (pool, namespace) of each Cinder backend seen in a connection_info, by the volume's
        #: ``os-vol-host-attr:host`` (or "" when Cinder does not show it): for watcher checks.
        self._pools: dict[str, tuple[str, str]] = {}

    def read(self, name: str, version: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise BackendError(f"{self.store_id}/{name}: bad range {offset}+{length}")
        h = self._acquire(version)
        doom = False
        try:
            n = max(0, min(length, h.size - offset))
            try:
                data = h.image.read(offset, n) if n else b""
            except Exception as e:
                doom = True
                err = rbd_error(e, f"{self.store_id}/{name}: read at {offset}")
                raise (Changed(str(err)) if isinstance(err, NotFound) else err) from None
            if len(data) != n:
                doom = True
                raise BackendError(f"{self.store_id}/{name}: short read at {offset}: "
                                   f"{len(data)} of {n} bytes")
            if h.attachment is None and self.rbdio.image_id(h.spec) != h.image_id:
                # No attachment of ours keeps the volume from being deleted, and librbd reads
                # zeros from a handle on a removed image: only a name that still refers to
                # this image, checked after the read, proves the bytes are this version's.
                doom = True
                raise Changed(f"{self.store_id}/{name}: volume {version} was removed while "
                              "read")
            return data
        finally:
            self._release(h, doom)

    def _learn_pool(self, v: Mapping[str, Any], spec: tuple[str, str, str]) -> None:
        with self._lock:
            self._pools[str(v.get("os-vol-host-attr:host") or "")] = spec[:2]

    def _acquire(self, vid: str) -> _ReadHandle:
        with self._lock:
            h = self._handles.get(vid)
            if h is not None:
                h.refs += 1
                return h
        deadline = time.monotonic() + self.volumes.wait_budget()
        with self._attach_locks.holding(vid, self.lock_wait(), lambda: BackendError(
                f"store {self.store_id}: volume {vid}: still being attached")):
            with self._lock:
                h = self._handles.get(vid)
                if h is not None:
                    h.refs += 1
                    return h
            try:
                v = self.api.volume(vid)
            except NotFound:
                raise Changed(f"store {self.store_id}: volume {vid} was removed since it was "
                              "opened") from None
            size = self.layout.image_size(v)
            if size is None:
                raise Changed(f"store {self.store_id}: volume {vid} no longer holds an image "
                              f"(status {v.get('status')})")
            try:
                aid: str | None
                aid, spec = self.volumes.attach(vid, "ro", deadline)
            except Busy:
                # Attached elsewhere and not multiattach: read it without an attachment if its
                # RBD image is known (rbd_pool, or a pool seen in this mount's attachments).
                known = self.known_spec(v)
                if known is None:
                    raise
                self.rbdio.connect()
                aid, spec = None, known
            else:
                self._learn_pool(v, spec)
            try:
                image = self.rbdio.open(spec, read_only=True)
                image_id = str(image.id()) if aid is None else ""
            except BaseException:
                if aid is not None:
                    self.volumes.detach(aid)
                raise
            h = _ReadHandle(vid, aid, image, size, refs=1, last_used=time.monotonic(),
                            spec=spec, image_id=image_id)
            with self._lock:
                self._handles[vid] = h
            return h

    def _release(self, h: _ReadHandle, doom: bool = False) -> None:
        with self._lock:
            h.refs -= 1
            h.last_used = time.monotonic()
            if doom and not h.doomed:
                h.doomed = True
                if self._handles.get(h.vid) is h:
                    del self._handles[h.vid]
            close = h.doomed and h.refs == 0
        if close:
            self._close_handle(h)

    def _close_handle(self, h: _ReadHandle) -> None:
        close_image(h.image)
        if h.attachment is not None:
            self.volumes.detach(h.attachment)

    def known_spec(self, v: Mapping[str, Any]) -> tuple[str, str, str] | None:
        """The RBD image of a volume without attaching it: Cinder's RBD driver names it
        ``volume-<id>`` (``<name_id>`` after a migration) in its pool."""
        with self._lock:
            where = (self.rbd_pool, "") if self.rbd_pool else (
                self._pools.get(str(v.get("os-vol-host-attr:host") or "")) or (
                    next(iter(self._pools.values())) if len(self._pools) == 1 else None))
        if where is None:
            return None
        return where[0], where[1], "volume-" + str(
            v.get("os-vol-mig-status-attr:name_id") or v["id"])

    def drop(self, vid: str) -> None:
        """Close this store's handle on ``vid`` (waiting, bounded, for reads in flight)."""
        with self._lock:
            h = self._handles.pop(vid, None)
            if h is None:
                return
            h.doomed = True
        deadline = time.monotonic() + self.lock_wait()
        while True:
            with self._lock:
                if h.refs == 0:
                    break
            if time.monotonic() > deadline:
                raise Busy(f"store {self.store_id}: volume {vid}: reads still running")
            time.sleep(0.02)
        self._close_handle(h)

    def reap(self, detach_after: float) -> None:
        """Detach volumes nobody read for ``detach_after`` seconds: an attachment keeps the
        volume in-use, which blocks other hosts (and Glance) from attaching or deleting it."""
        now = time.monotonic()
        with self._lock:
            idle = [h for h in self._handles.values()
                    if h.refs == 0 and now - h.last_used >= detach_after]
            for h in idle:
                del self._handles[h.vid]
                h.doomed = True
        for h in idle:
            try:
                self._close_handle(h)
            except Exception as e:
                log.warning("store %s: detaching idle volume %s: %s", self.store_id, h.vid, e)

    def adopt(self, vid: str, attachment: str, image: Any, size: int) -> None:
        """A just-published upload's attachment and Image become the read handle of the new
        image: reading it back right away needs no attach (detached after ``detach_after``)."""
        h = _ReadHandle(vid, attachment, image, size, last_used=time.monotonic())
        with self._lock:
            old = self._handles.get(vid)
            if old is None and not self._stop.is_set():
                self._handles[vid] = h
                return
        self._close_handle(h)

    def take_all(self) -> tuple[list[_ReadHandle], int]:
        """At close: every handle (waiting, bounded, for reads in flight), and how many reads
        were still running when the wait ended."""
        deadline = time.monotonic() + self.lock_wait()
        while True:
            with self._lock:
                busy = sum(h.refs for h in self._handles.values())
                if not busy or time.monotonic() > deadline:
                    handles, self._handles = list(self._handles.values()), {}
                    return handles, busy
            time.sleep(0.02)

    def close_all(self, handles: list[_ReadHandle]) -> None:
        for h in handles:
            h.doomed = True
            if h.refs == 0:
                self._close_handle(h)
