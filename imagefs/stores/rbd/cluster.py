"""The store's librados client: connecting, errors, blocklisting, and librbd's name → id object.

One ``rados.Rados`` per store, opened in ``open()`` and kept for the life of the mount;
librados reconnects to monitors and resends to OSDs by itself after transient errors. A
client the cluster blocklisted (ESHUTDOWN) never recovers: the store then opens a new client
(a new address, so not blocklisted) under a lock, once per blocklisting and with back-off,
and drops its cached read handles; the old client is shut down at ``close()``, which first
waits (bounded) for reads in flight.

``client_mount_timeout``, ``rados_mon_op_timeout`` and ``rados_osd_op_timeout`` are set to
the store's ``timeout``, so every librados/librbd call on a dead cluster returns ETIMEDOUT
(→ ``BackendError`` → EIO) instead of blocking a worker thread forever. ``rados``/``rbd`` are
imported inside ``open()``: validating a config never needs them.

The pieces without a client (``rbd_error``, ``client_conf``, ``unpack_id``, ``close_image``)
serve the cinder store's librbd data path too.
"""

from __future__ import annotations

import errno
import logging
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from imagefs.stores.base import (
    BackendError,
    Busy,
    NoSpace,
    NotFound,
    ReadOnly,
    StoreError,
)

log = logging.getLogger(__name__)

#: Waits for an upload's mutex (and for reads in flight at close) as a fraction of the store
#: timeout: shorter than the bridge's deadline, so a stuck call surfaces as an error here.
LOCK_WAIT_FRACTION = 0.8
#: Reconnect back-off after a blocklisting, in seconds (doubling up to the maximum).
RECONNECT_MIN, RECONNECT_MAX = 1.0, 60.0


def rbd_error(e: BaseException, what: str) -> StoreError:
    """librados/librbd exception → the store error ``imagefs.errors`` maps to errno."""
    if isinstance(e, StoreError):
        return e
    code = getattr(e, "errno", None)
    code = abs(code) if isinstance(code, int) else None
    text = f"{what}: {e}"
    if code == errno.ENOENT:
        return NotFound(text)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(text)
    if code in (errno.EBUSY, errno.ENOTEMPTY):
        return Busy(text)
    if code in (errno.EROFS, errno.EPERM, errno.EACCES):
        return ReadOnly(text)
    return BackendError(text)


def blocklisted(e: BaseException) -> bool:
    """The cluster blocklisted this client (EBLOCKLISTED is ESHUTDOWN): it never recovers."""
    code = getattr(e, "errno", None)
    return isinstance(code, int) and abs(code) == errno.ESHUTDOWN


def client_conf(timeout: float, keyring: str | None) -> dict[str, str]:
    """librados settings that bound every call by ``timeout`` (see the module docstring)."""
    t = str(max(1, int(timeout)))
    conf = {"client_mount_timeout": t, "rados_mon_op_timeout": t, "rados_osd_op_timeout": t}
    if keyring:
        conf["keyring"] = keyring
    return conf


def unpack_id(raw: bytes) -> str | None:
    """The id in librbd's name → id object ``rbd_id.<name>`` (a u32 length, then the id);
    None if it is too short to hold one."""
    if len(raw) < 4:
        return None
    (n,) = struct.unpack_from("<I", raw)
    return raw[4:4 + n].decode(errors="replace")


def close_image(image: Any) -> None:
    try:
        image.close()
    except Exception as e:
        log.debug("closing an rbd image: %s", e)


class Client:
    """The connected client of one store and its ioctx on the pool (and namespace).

    ``lock`` is the store's cache lock: the switch to a new client and ``on_new_client`` (the
    store dropping what belongs to the old one) happen under it, at once. ``on_new_client``
    returns images to close once the locks are released.
    """

    def __init__(self, store_id: str, conf: str, user: str, keyring: str | None, pool: str,
                 namespace: str, timeout: float, lock: threading.Lock,
                 on_new_client: Callable[[], list[Any]]) -> None:
        self.store_id = store_id
        self.conf = conf
        self.user = user
        self.keyring = keyring
        self.pool = pool
        self.namespace = namespace
        self.timeout = timeout
        self.fsid = ""
        self.cluster: Any = None
        self.ioctx: Any = None
        self.rados: Any = None
        self.rbd: Any = None
        self._lock = lock
        self._on_new_client = on_new_client
        #: Serializes (re)connecting and closing.
        self.conn_lock = threading.Lock()
        #: Clients replaced after a blocklisting: calls may still hold their handles, so they
        #: are shut down only at close().
        self._retired: list[tuple[Any, Any]] = []
        self._next_reconnect = 0.0
        self._backoff = RECONNECT_MIN
        self.closed = False

    def open(self) -> None:
        import rados
        import rbd

        self.rados, self.rbd = rados, rbd
        self.closed = False
        self.cluster, self.ioctx = self._connect()

    def _connect(self) -> tuple[Any, Any]:
        """A new connected client and its ioctx on the pool (and namespace)."""
        conf = client_conf(self.timeout, self.keyring)
        where = f"store {self.store_id}: cluster {self.conf} as client.{self.user}"
        try:
            cluster = self.rados.Rados(conffile=self.conf, rados_id=self.user, conf=conf)
        except Exception as e:
            raise BackendError(f"{where}: {e}") from None
        try:
            cluster.connect(timeout=int(conf["client_mount_timeout"]))
            self.fsid = cluster.get_fsid()
            ioctx = cluster.open_ioctx(self.pool)
            if self.namespace:
                ioctx.set_namespace(self.namespace)
        except Exception as e:
            cluster.shutdown()
            err = rbd_error(e, f"{where}, pool {self.pool}")
            raise (BackendError(str(err)) if isinstance(err, NotFound) else err) from None
        return cluster, ioctx

    def err(self, e: BaseException, what: str) -> StoreError:
        """``rbd_error``, and a reconnect if the error says this client was blocklisted."""
        if blocklisted(e):
            self.reconnect()
        return rbd_error(e, what)

    def reconnect(self) -> None:
        """Replace a blocklisted client: a new client has a new address, so it is not.

        Once per blocklisting: the current client is probed first (an error may come from a
        handle of a client already replaced), and attempts back off exponentially.
        """
        with self.conn_lock:
            if self.closed or self.ioctx is None or time.monotonic() < self._next_reconnect:
                return
            try:
                self.ioctx.stat("rbd_directory")
                return  # the current client works: the error came from a retired one
            except Exception as e:
                if not blocklisted(e):
                    return
            self._next_reconnect = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, RECONNECT_MAX)
            try:
                cluster, ioctx = self._connect()
            except StoreError as e:
                log.warning("store %s: this client was blocklisted and reconnecting failed: %s",
                            self.store_id, e)
                return
            with self._lock:
                self._retired.append((self.cluster, self.ioctx))
                self.cluster, self.ioctx = cluster, ioctx
                idle = self._on_new_client()
            self._backoff = RECONNECT_MIN
            log.warning("store %s: this client was blocklisted by the cluster; reconnected as a "
                        "new client", self.store_id)
        for image in idle:
            close_image(image)

    def take_clients(self) -> list[tuple[Any, Any]]:
        """At close (under ``conn_lock`` and the store lock): every client, current and
        retired, to shut down; the store is not connected any more."""
        clients, self._retired = self._retired, []
        if self.cluster is not None:
            clients.append((self.cluster, self.ioctx))
        self.cluster = self.ioctx = None
        return clients

    @staticmethod
    def shutdown(clients: list[tuple[Any, Any]]) -> None:
        for cluster, ioctx in clients:
            try:
                ioctx.close()
            finally:
                cluster.shutdown()

    def lock_wait(self) -> float:
        return max(0.05, self.timeout * LOCK_WAIT_FRACTION)

    # ------------------------------------------------------------------ primitives
    def conn(self) -> Any:
        """The ioctx; ``BackendError`` if the store is not connected."""
        if self.ioctx is None:
            raise BackendError(f"store {self.store_id} is not connected")
        return self.ioctx

    def image_id(self, name: str) -> str:
        """The id ``name`` refers to now: one small read of librbd's own name→id object."""
        try:
            raw = self.conn().read("rbd_id." + name, 4096, 0)
        except Exception as e:
            raise self.err(e, f"{self.store_id}/{name}") from None
        image_id = unpack_id(raw)
        if image_id is None:
            raise BackendError(f"{self.store_id}/{name}: malformed rbd_id object")
        return image_id

    def id_or_none(self, name: str) -> str | None:
        """The id ``name`` refers to, or None if no image has that name."""
        try:
            return self.image_id(name)
        except NotFound:
            return None

    def open_image(self, name: str, read_only: bool = True) -> Any:
        try:
            return self.rbd.Image(self.conn(), name, read_only=read_only)
        except Exception as e:
            raise self.err(e, f"{self.store_id}/{name}") from None

    def rename(self, old: str, new: str) -> None:
        """librbd's rename (raises librbd's own exceptions: callers judge ImageExists)."""
        self.rbd.RBD().rename(self.conn(), old, new)

    def entries(self) -> list[tuple[str, str]]:
        """(name, id) of every image in the pool's directory, in one call."""
        try:
            return [(e["name"], e["id"]) for e in self.rbd.RBD().list2(self.conn())]
        except Exception as e:
            raise self.err(e, f"store {self.store_id}: listing pool {self.pool}") from None
