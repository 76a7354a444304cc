"""Reading published images: a pool of read-only handles, and the check after every read.

``read_range`` keeps a small pool of read-only ``Image`` handles per (name, id) and, *after*
each read, re-reads ``rbd_id.<name>`` (one tiny RADOS read) to check the name still refers to
that id. The check must come after the read: librbd returns zeros, not an error, from a handle
on an image that was deleted meanwhile, so an unchecked read of a replaced image could mix old
bytes with zeros. (``rbd_id.<name>`` is the format-2 name→id object librbd itself uses.)
A read of an image deleted since the file was opened is ``Changed`` (EIO), as after a
replace, never ``NotFound``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from imagefs.stores.base import BackendError, Changed, NotFound
from imagefs.stores.rbd.cluster import Client, close_image

log = logging.getLogger(__name__)

#: Read handles kept open per store (each holds an ImageCtx and a few threads' worth of state).
MAX_HANDLES = 32


class _Handle:
    """A read-only Image shared by concurrent ``read_range`` calls; closed when unused."""

    __slots__ = ("image", "refs", "doomed")

    def __init__(self, image: Any) -> None:
        self.image = image
        self.refs = 1
        self.doomed = False


class Reader:
    """The handle pool of one store; ``lock`` is the store's cache lock."""

    def __init__(self, store_id: str, client: Client, lock: threading.Lock) -> None:
        self.store_id = store_id
        self.client = client
        self._lock = lock
        self._handles: OrderedDict[tuple[str, str], _Handle] = OrderedDict()

    def read(self, name: str, version: str, offset: int, length: int) -> bytes:
        """The range as one piece (``read_range``), by the same checked path as blocks."""
        pieces = self.read_blocks(name, version, offset, length, max(length, 1))
        return pieces[0] if pieces else b""

    def read_blocks(self, name: str, version: str, offset: int, length: int, block: int
                    ) -> list[bytes]:
        """The range as ``block``-byte pieces (the last may be shorter), read by one librbd
        aio read each, all in flight at once, checked once after the last.

        Why: one ``read`` of a 16 MiB run cut into 1 MiB blocks copied each block with the
        GIL held (py-spy --gil: 14 of 80 samples on a cold read); separate reads give the
        blocks their own buffers, and librbd still reads the objects in parallel."""
        if offset < 0 or length < 0 or block <= 0:
            raise BackendError(f"{self.store_id}/{name}: bad range {offset}+{length}")
        h = self._acquire(name, version)
        doom = False
        what = f"{self.store_id}/{name}: read at {offset}"
        try:
            try:
                size = h.image.size()
            except Exception as e:
                doom = True
                raise self._gone_is_changed(e, what) from None
            end = offset + max(0, min(length, size - offset))
            spans = [(o, min(block, end - o)) for o in range(offset, end, block)]
            got: list[Any] = [None] * len(spans)
            left = [len(spans)]
            cond = threading.Condition()

            def completion(i: int) -> Callable[[Any, Any], None]:
                def done(comp: Any, data: Any) -> None:
                    with cond:
                        rv = comp.get_return_value()
                        got[i] = data if rv >= 0 else OSError(-rv, os.strerror(-rv))
                        left[0] -= 1
                        if not left[0]:  # the reader waits for all: wake it once
                            cond.notify_all()
                return done

            try:
                for i, (o, n) in enumerate(spans):
                    h.image.aio_read(o, n, completion(i))
            except Exception as e:
                doom = True
                raise self._gone_is_changed(e, what) from None
            with cond:
                # librados ends each op by the store timeout (ETIMEDOUT); this is the backstop.
                if not cond.wait_for(lambda: left[0] == 0, timeout=self.client.timeout * 1.5):
                    doom = True
                    raise BackendError(f"{what}: no answer within {self.client.timeout:g}s")
            for (o, n), data in zip(spans, got, strict=True):
                if isinstance(data, BaseException):
                    doom = True
                    raise self._gone_is_changed(data, f"{self.store_id}/{name}: read at {o}")
                if not isinstance(data, bytes) or len(data) != n:
                    doom = True
                    raise BackendError(f"{self.store_id}/{name}: short read at {o}: "
                                       f"{len(data or b'')} of {n} bytes")
            if not self._still(name, version):
                doom = True
                raise Changed(f"{self.store_id}/{name} changed since it was opened")
            return got
        finally:
            self._release((name, version), h, doom)

    def _gone_is_changed(self, e: BaseException, what: str) -> Exception:
        """The store error for a failed read; an image deleted under an open reader is
        ``Changed`` (EIO), as after a replace, not ``NotFound``."""
        err = self.client.err(e, what)
        return Changed(str(err)) if isinstance(err, NotFound) else err

    def _still(self, name: str, version: str) -> bool:
        """After a read: a handle on a deleted image reads zeros, so only a name that still
        refers to this id proves the bytes are this version's."""
        try:
            return self.client.image_id(name) == version
        except NotFound:
            return False

    def _acquire(self, name: str, version: str) -> _Handle:
        key = (name, version)
        with self._lock:
            h = self._handles.get(key)
            if h is not None:
                h.refs += 1
                self._handles.move_to_end(key)
                return h
        try:
            image = self.client.open_image(name)
        except NotFound:
            # Deleted (or renamed away) since the file was opened: that version is gone, as
            # after a replace (EIO), not a missing file (ENOENT) for an open descriptor.
            raise Changed(f"{self.store_id}/{name} was removed since it was opened") from None
        try:
            same = image.id() == version
        except Exception as e:
            close_image(image)
            raise self.client.err(e, f"{self.store_id}/{name}") from None
        if not same:
            close_image(image)
            raise Changed(f"{self.store_id}/{name} changed since it was opened")
        spare = []
        with self._lock:
            h = self._handles.get(key)
            if h is not None:  # another thread opened it meanwhile: use that one
                h.refs += 1
                spare.append(image)
            else:
                h = self._handles[key] = _Handle(image)
                for k in [k for k, v in self._handles.items() if v.refs == 0]:
                    if len(self._handles) <= MAX_HANDLES:
                        break
                    spare.append(self._handles.pop(k).image)
        for img in spare:
            close_image(img)
        return h

    def _release(self, key: tuple[str, str], h: _Handle, doom: bool = False) -> None:
        with self._lock:
            h.refs -= 1
            if doom and not h.doomed:
                h.doomed = True
                if self._handles.get(key) is h:
                    del self._handles[key]
            close = h.doomed and h.refs == 0
        if close:
            close_image(h.image)

    def doom_all(self) -> list[Any]:
        """Under the lock: drop every handle (closed when its last read ends); returns the
        images of idle ones, for the caller to close once the lock is released."""
        handles, self._handles = list(self._handles.values()), OrderedDict()
        for h in handles:
            h.doomed = True
        return [h.image for h in handles if h.refs == 0]

    def busy(self) -> int:
        """Under the lock: reads in flight."""
        return sum(h.refs for h in self._handles.values())

    def close(self, clients_of: Callable[[], list[tuple[Any, Any]]]) -> None:
        """Close every handle (waiting, bounded, for reads in flight), then the clients.

        ``clients_of()`` runs under the lock together with taking the handles, so no read
        opens a handle of a client about to be shut down."""
        deadline = time.monotonic() + self.client.lock_wait()
        while True:
            with self._lock:
                busy = self.busy()
                if not busy or time.monotonic() > deadline:
                    handles, self._handles = list(self._handles.values()), OrderedDict()
                    clients = clients_of()
                    break
            time.sleep(0.02)
        if busy:
            log.warning("store %s: closing with %d read(s) still running", self.store_id, busy)
        for h in handles:
            h.doomed = True
            if h.refs == 0:
                close_image(h.image)
        self.client.shutdown(clients)
