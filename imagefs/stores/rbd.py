"""``type = "rbd"``: images are RBD images in one Ceph pool (optionally one RBD namespace).

This is how Glance and Nova keep images, so hypervisors using Ceph directly see the same images.
Each store has its own cluster connection (``conf``, ``user``, ``keyring``), so one mount can
serve several clusters, and several pools of one cluster, at once.

Connection
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

Uploads
    An upload is a hidden image ``.imagefs-<owner id>`` (see ``owners.py``) created in
    the pool at open and written in place at any offset (capability ``random_write``, so
    ``writer.py`` never spools). The image grows geometrically ahead of the writes (a resize is a
    header update, not free) and is resized to the exact logical size at commit. librbd's cache
    is switched to writeback at once (an empty flush), so FUSE's small writes coalesce. All-zero
    writes become ``write_zeroes``, which allocates nothing on objects that do not exist yet:
    sparse images stay sparse. Commit sets metadata, flushes, (glance_layout) creates and protects
    snapshot ``snap``, then renames the image to its final name: the name only ever shows a
    complete image, with its snapshot already there. The published size is the last
    ``truncate`` (``writer.py`` always sends one before commit) or the end of the furthest write.

    The bridge abandons calls that pass their deadline, so a call on an upload may still run
    when the next arrives. Every librbd call of an upload runs under its mutex (waits bounded
    below the store timeout); a call that fails or ends after its deadline marks the upload
    dead, and every later call raises ``BackendError``. ``abort`` marks it dead at once (a
    commit checks that just before its rename) and removes the hidden image only while
    ``rbd_id.<hidden name>`` still names this upload's image: a published image is never
    touched by its hidden name.

Replacing an existing image (commit or rename onto an existing name)
    RBD cannot rename over an existing image, so replacement is three steps:
    (1) tag the old image with ``imagefs.restore_name`` and ``imagefs.aside_at`` (the time) and
    rename it to a hidden ``...-old`` name; (2) rename the new image to the name and remove the
    ``restore_name`` tag from the old one; (3) delete the old one. If (2) fails the old image is
    renamed back. After any failed rename, ``rbd_id.<name>`` of both names is read again before
    anything is rolled back or removed (a rename that timed out may have happened). A crash
    between (1) and (2) leaves the old image hidden but intact, and ``cleanup_leftovers`` renames
    it back (the tag says where) if the name is still free; a crash after (2) leaves an untagged
    hidden old image that cleanup deletes. Other hosts' aside images are judged by
    ``aside_at``, not by their creation time. So a crash never loses the published image, and
    no reader ever sees a partial one; the price is a short window between (1) and (2) where a
    fresh lookup by another client finds no image. The alternative order (new in first) is
    impossible without an atomic rename-over. An image that imagefs could not remove afterwards
    is refused in step (1), before anything is renamed, and never deleted either: ``Busy``
    (EBUSY) and a log line, when a snapshot has clones, when it has snapshots other than
    ``snap``, or (replace only) when another client watches it (a VM, ``rbd map``).

Versions and reads
    ``version`` is the RBD image id: every upload is a new image, so new bytes mean a new id,
    while renames and metadata changes keep it. Bytes written in place by other tools (``rbd map``
    + dd) are not seen as a change: Glance treats images as immutable, and so does this store.
    ``read_range`` keeps a small pool of read-only ``Image`` handles per (name, id) and, *after*
    each read, re-reads ``rbd_id.<name>`` (one tiny RADOS read) to check the name still refers to
    that id. The check must come after the read: librbd returns zeros, not an error, from a handle
    on an image that was deleted meanwhile, so an unchecked read of a replaced image could mix old
    bytes with zeros. (``rbd_id.<name>`` is the format-2 name→id object librbd itself uses.)
    A read of an image deleted since the file was opened is ``Changed`` (EIO), as after a
    replace, never ``NotFound``.

Listing and stat cache
    ``list()`` gets names and ids in one call (``list2``); the per-image facts (size, metadata)
    need an image open each (up to 8 at once), so they are cached per (name, id) for ``stat_ttl``
    seconds, on top of the mount's own ``metadata_ttl`` catalog. A replaced image has a new id,
    so the cache can only be stale about changes made by *other* clients to metadata
    (mtime/mode/hashes) or to size in place, and only for ``stat_ttl``. imagefs's own changes
    update it at once. ``stat()`` of a cached image costs one small read (``rbd_id.<name>``).

Locations
    ``rbd://<fsid>/<pool>/<image>/snap``, exactly what Glance records (each part
    percent-encoded, as glance_store decodes them), for every image that has the snapshot
    ``snap`` Glance reads: all images a glance_layout store publishes, and the images Glance
    wrote, whatever this store's glance_layout. glance_store parses only 1 or 4 components
    (``rbd://<image>`` means "in the pool Glance is configured with", which imagefs cannot vouch
    for), so an image without that snapshot, or any image of a store with a namespace (Glance
    cannot name one), has no Glance location: ``location`` raises ``Unsupported`` saying why.
"""

from __future__ import annotations

import calendar
import concurrent.futures
import contextlib
import errno
import logging
import random
import struct
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

from imagefs.options import Option, StoreConfig
from imagefs.stores.base import (
    HIDDEN_PREFIX,
    BackendError,
    Busy,
    Capability,
    Changed,
    ImageInfo,
    NoSpace,
    NotFound,
    OptionError,
    ReadOnly,
    Store,
    StoreError,
    Unsupported,
    Upload,
    check_name,
    is_hidden,
    meta_mode,
    meta_mtime,
    user_meta,
)
from imagefs.stores.owners import new_owner_id, owner_state

log = logging.getLogger(__name__)

MiB = 1 << 20
#: RBD metadata keys imagefs owns: ``imagefs.<key>`` (``conf_*`` keys would be librbd config).
META_PREFIX = "imagefs."
#: On an image moved aside during a replace: the name to give it back after a crash.
RESTORE_KEY = META_PREFIX + "restore_name"
#: Glance's snapshot name (glance_store's rbd driver always uses this one).
SNAP = "snap"
#: Suffix of images moved aside while being replaced.
OLD_SUFFIX = "-old"
#: Read handles kept open per store (each holds an ImageCtx and a few threads' worth of state).
MAX_HANDLES = 32
#: Uploads grow ahead of the writes by doubling, at most this much at a time.
GROW_MAX = 1 << 30
GROW_ALIGN = 4 * MiB
#: Images opened at once to fill the stat cache in ``list()``.
LIST_WORKERS = 8
#: Attempts at publishing when another client publishes the same name at the same moment.
PUBLISH_TRIES = 5
#: On an image moved aside during a replace: when (time.time()) it was moved aside. Its
#: create_timestamp is the old image's birth, useless to judge whether a replace is still on.
ASIDE_KEY = META_PREFIX + "aside_at"
#: Waits for an upload's mutex (and for reads in flight at close) as a fraction of the store
#: timeout: shorter than the bridge's deadline, so a stuck call surfaces as an error here.
LOCK_WAIT_FRACTION = 0.8
#: An upload call that ends later than this fraction of its deadline was (or may have been)
#: abandoned by the bridge: its effects must not count.
LATE_FRACTION = 0.9
#: Reconnect back-off after a blocklisting, in seconds (doubling up to the maximum).
RECONNECT_MIN, RECONNECT_MAX = 1.0, 60.0


def _errno(e: BaseException) -> int | None:
    return getattr(e, "errno", None)


def _fail(e: BaseException, what: str) -> StoreError:
    """librados/librbd exception → the store error ``fs.py`` maps to errno."""
    if isinstance(e, StoreError):
        return e
    code = _errno(e)
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
    retry = code in (errno.ETIMEDOUT, errno.EAGAIN, errno.ESHUTDOWN, errno.ECONNREFUSED,
                     errno.ENOTCONN, errno.EIO)
    return BackendError(text, retryable=retry)


def _blocklisted(e: BaseException) -> bool:
    """The cluster blocklisted this client (EBLOCKLISTED is ESHUTDOWN): it never recovers."""
    code = _errno(e)
    return isinstance(code, int) and abs(code) == errno.ESHUTDOWN


def _all_zero(data: bytes) -> bool:
    return data[0] == 0 and data[-1] == 0 and data.count(0) == len(data)


def _timestamp(dt: Any) -> float:
    """librbd's naive UTC datetimes → seconds since the epoch."""
    try:
        return float(calendar.timegm(dt.utctimetuple()))
    except (AttributeError, TypeError, ValueError):
        return time.time()


class _Handle:
    """A read-only Image shared by concurrent ``read_range`` calls; closed when unused."""

    __slots__ = ("image", "refs", "doomed")

    def __init__(self, image: Any) -> None:
        self.image = image
        self.refs = 1
        self.doomed = False


class RbdUpload(Upload):
    """A hidden image being written; becomes visible only in ``commit``.

    Every call on the librbd ``Image`` runs under ``_mutex``: the bridge abandons a call that
    passes its deadline, so a write may still run while the next call (truncate, commit, abort)
    arrives, and librbd does not survive a resize racing a write on one Image. Waits for the
    mutex are bounded below the store timeout. A call that fails, or that finishes after its
    deadline (its thread was abandoned), marks the upload ``dead``: every later call raises
    ``BackendError``, so bytes of unknown state are never published. ``abort`` marks it dead
    without waiting; if the mutex stays busy, the call holding it cleans up when it ends.
    """

    def __init__(self, store: RbdStore, name: str, size_hint: int | None) -> None:
        self.store = store
        self.name = name
        tmp = f"{HIDDEN_PREFIX}{new_owner_id()}"
        #: The hidden image's name; None once published (or removed): nothing left to clean.
        self.tmp: str | None = tmp
        self.size = 0  # the logical size: what commit publishes
        self.capacity = size_hint or 0  # the image's actual size, ahead of ``size`` on growth
        self.image: Any = None
        self.image_id = ""
        #: Set by abort, by a failed call and by a call that outlived its deadline.
        self.dead = False
        #: abort() ran (or is waiting): whoever holds the mutex last removes the image.
        self.aborting = False
        self._mutex = threading.Lock()
        rbd = store.rbd
        try:
            rbd.RBD().create(store._conn(), tmp, self.capacity)
        except Exception as e:
            raise store._err(e, f"{store.id}: cannot create upload image for {name}") from None
        try:
            self.image = rbd.Image(store._conn(), tmp)
            self.image_id = self.image.id()
            # librbd keeps its cache writethrough until the first flush it sees
            # (rbd_cache_writethrough_until_flush): FUSE hands over 128 KiB writes, each then a
            # synchronous OSD round trip. An empty flush now switches to writeback; commit
            # flushes before the image gets its name, so nothing unflushed is ever published.
            self.image.flush()
        except Exception as e:
            self.dead = True
            if self.image is not None:
                store._close_image(self.image)
                self.image = None
            if self.image_id:
                self._remove_tmp()
            else:  # opened nothing: the name can only be ours (it has a random part)
                try:
                    store._remove_image(tmp)
                except StoreError as e2:
                    log.warning("%s: could not remove upload image %s: %s", store.id, tmp, e2)
            raise store._err(e, f"{store.id}: cannot open upload image for {name}") from None

    def _what(self) -> str:
        return f"{self.store.id}/{self.name}"

    @contextlib.contextmanager
    def _locked(self, what: str, deadline: float | None) -> Iterator[Any]:
        """The Image, under the mutex, for one call; any failure kills the upload.

        ``deadline`` is the caller's bridge deadline in seconds (None: not bounded here); a
        call that ends after it was abandoned by the bridge, so its effects must not count.
        """
        t0 = time.monotonic()
        if not self._mutex.acquire(timeout=self.store._lock_wait()):
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
                raise self.store._err(e, f"{self._what()}: {what}") from None
            if deadline is not None and time.monotonic() - t0 > deadline * LATE_FRACTION:
                self.dead = True
                raise BackendError(f"{self._what()}: {what} outlived its deadline",
                                   retryable=True)
        finally:
            try:
                if self.aborting:
                    self._abort_locked()
            finally:
                self._mutex.release()

    def _grow(self, img: Any, end: int) -> None:
        """Make the image at least ``end`` bytes; never shrinks it."""
        if end <= self.capacity:
            return
        want = max(end, self.capacity + min(self.capacity, GROW_MAX))
        want = -(-want // GROW_ALIGN) * GROW_ALIGN
        want = max(want, img.size())
        img.resize(want)
        self.capacity = want

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
        self.size = max(self.size, end)  # only reached if the call counted (see _locked)

    def read(self, offset: int, length: int) -> bytes:
        with self._locked(f"read at {offset}", self.store.timeout) as img:
            n = max(0, min(length, self.size - offset))
            data = img.read(offset, n) if n else b""
        return data + bytes(n - len(data))

    def truncate(self, size: int) -> None:
        with self._locked(f"truncate to {size}", self.store.timeout) as img:
            if size < self.capacity:
                # Shrinking drops the bytes past ``size``; growing later reads zeros there.
                img.resize(size)
                self.capacity = size
            else:
                self._grow(img, size)
            self.size = size

    def flush(self) -> None:
        with self._locked("flush", self.store.timeout) as img:
            img.flush()

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
                if store.glance_layout:
                    img.create_snap(SNAP)
                    img.protect_snap(SNAP)
                created = _timestamp(img.create_timestamp())
                self.image = None
                store._close_image(img)
                if self.dead:  # aborted meanwhile (abort does not wait for the mutex to mark it)
                    raise BackendError(f"{self._what()}: aborted during publish")
                assert self.tmp is not None
                tmp, self.tmp = self.tmp, None  # from here on, never touched by that name
                try:
                    store._publish(tmp, self.name, self.image_id)
                except BaseException:
                    self.tmp = tmp  # not published: _remove_tmp checks the id before removing
                    raise
        except BaseException:
            self.abort()
            raise
        info = ImageInfo(name=self.name, size=self.size, mtime=meta_mtime(stored, created),
                         mode=meta_mode(stored), version=self.image_id, meta=stored)
        store._remember(info)
        with store._lock:
            store._snapped[self.name] = (self.image_id, store.glance_layout, time.monotonic())
        return info

    def _remove_tmp(self) -> None:
        """Remove the upload image, only if its name still refers to this upload's image."""
        tmp, self.tmp = self.tmp, None
        if tmp is None:
            return
        store = self.store
        try:
            if self.image_id and store._image_id(tmp) != self.image_id:
                log.warning("%s: %s no longer names this upload's image: not removing it",
                            store.id, tmp)
                return
            store._remove_image(tmp)
        except NotFound:
            pass
        except StoreError as e:
            log.warning("%s: could not remove upload image %s: %s (removed at next mount)",
                        store.id, tmp, e)

    def _abort_locked(self) -> None:
        self.dead = True
        self.aborting = False
        img, self.image = self.image, None
        if img is not None:
            self.store._close_image(img)
        self._remove_tmp()

    def abort(self) -> None:
        self.dead = True
        self.aborting = True
        if not self._mutex.acquire(timeout=self.store._lock_wait()):
            # The call holding the mutex sees ``aborting`` when it ends and cleans up then.
            log.warning("%s: abort: an earlier call on this upload is still running; its image "
                        "is removed when that call ends", self._what())
            return
        try:
            if self.aborting:
                self._abort_locked()
        finally:
            self._mutex.release()


class RbdStore(Store):
    type_name = "rbd"
    OPTIONS = {
        "conf": Option("path", required=True, help="ceph.conf of the cluster"),
        "pool": Option("str", required=True, help="RADOS pool holding the images"),
        "user": Option("str", default="admin",
                       help="cephx client id (client.<user>); its key from conf or keyring"),
        "keyring": Option("path", help="keyring file, if ceph.conf does not name it"),
        "namespace": Option("str", default="", help="RBD namespace within the pool"),
        "glance_layout": Option("bool", default=False,
                                help="after publish, create and protect snapshot 'snap'"),
        "stat_ttl": Option("float", default=10.0,
                           help="seconds image facts (size, metadata) are reused per image id"),
        "leftover_age": Option("float", default=86400.0,
                               help="seconds after which uploads of other hosts count as dead"),
    }
    capabilities = Capability.RANDOM_WRITE

    def __init__(self, cfg: StoreConfig) -> None:
        super().__init__(cfg)
        o = self.options
        self.conf: str = o["conf"]
        self.pool: str = o["pool"]
        user = o["user"] or "admin"
        self.user: str = user[len("client."):] if user.startswith("client.") else user
        self.keyring: str | None = o["keyring"]
        self.namespace: str = o["namespace"] or ""
        self.glance_layout: bool = o["glance_layout"]
        self.stat_ttl: float = o["stat_ttl"]
        self.leftover_age: float = o["leftover_age"]
        self.fsid = ""
        self.cluster: Any = None
        #: Serializes (re)connecting; ``_lock`` guards the caches.
        self._conn_lock = threading.Lock()
        #: Clients replaced after a blocklisting: calls may still hold their handles, so they
        #: are shut down only at close().
        self._retired: list[tuple[Any, Any]] = []
        self._next_reconnect = 0.0
        self._backoff = RECONNECT_MIN
        self._closed = False
        self.ioctx: Any = None
        self.rados: Any = None
        self.rbd: Any = None
        self._stats: dict[str, tuple[float, ImageInfo]] = {}
        #: name -> (image id, has the snapshot ``snap``, monotonic time seen): for ``location``,
        #: trusted for ``stat_ttl`` like the other image facts (others may add the snapshot)
        self._snapped: dict[str, tuple[str, bool, float]] = {}
        self._handles: OrderedDict[tuple[str, str], _Handle] = OrderedDict()

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        if not options.get("pool"):
            raise OptionError("pool", "a pool name")
        user = options.get("user")
        if user is not None and (not user or user == "client."):
            raise OptionError("user", "a cephx client id such as \"glance\"")
        if options.get("glance_layout") and options.get("namespace"):
            raise OptionError("glance_layout", "false when namespace is set: Glance's rbd:// "
                                               "locations cannot name an RBD namespace")
        for key in ("stat_ttl", "leftover_age"):
            value = options.get(key)
            if value is not None and value < 0:
                raise OptionError(key, "a number of seconds, 0 or more")

    # ------------------------------------------------------------------ connection
    def open(self) -> None:
        import rados
        import rbd

        self.rados, self.rbd = rados, rbd
        self._closed = False
        self.cluster, self.ioctx = self._connect()
        log.info("store %s: connected to cluster %s, pool %s%s", self.id, self.fsid, self.pool,
                 f", namespace {self.namespace}" if self.namespace else "")

    def _connect(self) -> tuple[Any, Any]:
        """A new connected client and its ioctx on the pool (and namespace)."""
        rados = self.rados
        t = str(max(1, int(self.timeout)))
        conf = {"client_mount_timeout": t, "rados_mon_op_timeout": t, "rados_osd_op_timeout": t}
        if self.keyring:
            conf["keyring"] = self.keyring
        where = f"store {self.id}: cluster {self.conf} as client.{self.user}"
        try:
            cluster = rados.Rados(conffile=self.conf, rados_id=self.user, conf=conf)
        except Exception as e:
            raise BackendError(f"{where}: {e}") from None
        try:
            cluster.connect(timeout=int(t))
            self.fsid = cluster.get_fsid()
            ioctx = cluster.open_ioctx(self.pool)
            if self.namespace:
                ioctx.set_namespace(self.namespace)
        except Exception as e:
            cluster.shutdown()
            err = _fail(e, f"{where}, pool {self.pool}")
            raise (BackendError(str(err)) if isinstance(err, NotFound) else err) from None
        return cluster, ioctx

    def _err(self, e: BaseException, what: str) -> StoreError:
        """``_fail``, and a reconnect if the error says this client was blocklisted."""
        if _blocklisted(e):
            self._reconnect()
        return _fail(e, what)

    def _reconnect(self) -> None:
        """Replace a blocklisted client: a new client has a new address, so it is not.

        Once per blocklisting: the current client is probed first (an error may come from a
        handle of a client already replaced), and attempts back off exponentially.
        """
        with self._conn_lock:
            if self._closed or self.ioctx is None or time.monotonic() < self._next_reconnect:
                return
            try:
                self.ioctx.stat("rbd_directory")
                return  # the current client works: the error came from a retired one
            except Exception as e:
                if not _blocklisted(e):
                    return
            self._next_reconnect = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, RECONNECT_MAX)
            try:
                cluster, ioctx = self._connect()
            except StoreError as e:
                log.warning("store %s: this client was blocklisted and reconnecting failed: %s",
                            self.id, e)
                return
            with self._lock:
                self._retired.append((self.cluster, self.ioctx))
                self.cluster, self.ioctx = cluster, ioctx
                handles, self._handles = list(self._handles.values()), OrderedDict()
                for h in handles:
                    h.doomed = True
                idle = [h.image for h in handles if h.refs == 0]
                self._stats.clear()
            self._backoff = RECONNECT_MIN
            log.warning("store %s: this client was blocklisted by the cluster; reconnected as a "
                        "new client", self.id)
        for image in idle:
            self._close_image(image)

    def close(self) -> None:
        """Close read handles (waiting, bounded, for reads in flight), then the clients."""
        with self._conn_lock:
            self._closed = True
            deadline = time.monotonic() + self._lock_wait()
            while True:
                with self._lock:
                    busy = sum(h.refs for h in self._handles.values())
                    if not busy or time.monotonic() > deadline:
                        handles, self._handles = list(self._handles.values()), OrderedDict()
                        clients, self._retired = self._retired, []
                        if self.cluster is not None:
                            clients.append((self.cluster, self.ioctx))
                        self.cluster = self.ioctx = None
                        break
                time.sleep(0.02)
            if busy:
                log.warning("store %s: closing with %d read(s) still running", self.id, busy)
            for h in handles:
                h.doomed = True
                if h.refs == 0:
                    self._close_image(h.image)
            for cluster, ioctx in clients:
                try:
                    ioctx.close()
                finally:
                    cluster.shutdown()

    def _lock_wait(self) -> float:
        return max(0.05, self.timeout * LOCK_WAIT_FRACTION)

    def _conn(self) -> Any:
        if self.ioctx is None:
            raise BackendError(f"store {self.id} is not connected")
        return self.ioctx

    # ------------------------------------------------------------------ helpers
    def _image_id(self, name: str) -> str:
        """The id ``name`` refers to now: one small read of librbd's own name→id object."""
        try:
            raw = self._conn().read("rbd_id." + name, 4096, 0)
        except Exception as e:
            raise self._err(e, f"{self.id}/{name}") from None
        if len(raw) < 4:
            raise BackendError(f"{self.id}/{name}: malformed rbd_id object")
        (n,) = struct.unpack_from("<I", raw)
        return raw[4:4 + n].decode()

    def _open_image(self, name: str, read_only: bool = True) -> Any:
        try:
            return self.rbd.Image(self._conn(), name, read_only=read_only)
        except Exception as e:
            raise self._err(e, f"{self.id}/{name}") from None

    @staticmethod
    def _close_image(image: Any) -> None:
        try:
            image.close()
        except Exception as e:
            log.debug("closing an rbd image: %s", e)

    def _info(self, name: str, image: Any) -> ImageInfo:
        meta = {k[len(META_PREFIX):]: v for k, v in image.metadata_list()
                if k.startswith(META_PREFIX) and k != RESTORE_KEY}
        self._note_snap(name, image)
        return ImageInfo(name=name, size=image.size(),
                         mtime=meta_mtime(meta, _timestamp(image.create_timestamp())),
                         mode=meta_mode(meta), version=image.id(), meta=meta)

    def _remember(self, info: ImageInfo) -> None:
        with self._lock:
            self._stats[info.name] = (time.monotonic(), info)

    def _cached(self, name: str, image_id: str) -> ImageInfo | None:
        with self._lock:
            hit = self._stats.get(name)
        if hit and hit[1].version == image_id and time.monotonic() - hit[0] < self.stat_ttl:
            return hit[1]
        return None

    def _forget(self, name: str) -> None:
        with self._lock:
            self._stats.pop(name, None)
            self._snapped.pop(name, None)

    def _note_snap(self, name: str, image: Any) -> bool:
        """Remember whether ``image`` (open, called ``name``) has Glance's snapshot (read from
        the header the open loaded: no extra round trip)."""
        has = any(s["name"] == SNAP for s in image.list_snaps())
        with self._lock:
            if len(self._snapped) >= 4096:
                self._snapped.pop(next(iter(self._snapped)))
            self._snapped[name] = (image.id(), has, time.monotonic())
        return has

    def _has_glance_snap(self, name: str) -> bool:
        """Whether the image now called ``name`` has the snapshot ``snap``: remembered per
        image id for ``stat_ttl`` (one small read to check the id), else read from the image."""
        image_id = self._image_id(name)
        with self._lock:
            hit = self._snapped.get(name)
        if hit is not None and hit[0] == image_id and \
                time.monotonic() - hit[2] < self.stat_ttl:
            return hit[1]
        image = self._open_image(name)
        try:
            return self._note_snap(name, image)
        except Exception as e:
            raise self._err(e, f"{self.id}/{name}: snapshots") from None
        finally:
            self._close_image(image)

    def _stat_fresh(self, name: str) -> ImageInfo:
        image = self._open_image(name)
        try:
            info = self._info(name, image)
        except Exception as e:
            raise self._err(e, f"{self.id}/{name}") from None
        finally:
            self._close_image(image)
        self._remember(info)
        return info

    # ------------------------------------------------------------------ reading
    def list(self) -> Iterator[ImageInfo]:
        try:
            entries = [(e["name"], e["id"]) for e in self.rbd.RBD().list2(self._conn())]
        except Exception as e:
            raise self._err(e, f"store {self.id}: listing pool {self.pool}") from None
        names: list[str] = []
        infos: dict[str, ImageInfo] = {}
        for name, image_id in entries:
            if is_hidden(name):
                continue
            try:
                check_name(name)
            except StoreError:
                continue  # an RBD name no file can have (too long): not served
            names.append(name)
            info = self._cached(name, image_id)
            if info is not None:
                infos[name] = info
        todo = [n for n in names if n not in infos]
        if todo:
            # Each uncached image costs an open (a few round trips): overlap them.
            with concurrent.futures.ThreadPoolExecutor(
                    max_workers=min(LIST_WORKERS, len(todo))) as pool:
                futures = {n: pool.submit(self._stat_fresh, n) for n in todo}
                for n, fut in futures.items():
                    try:
                        infos[n] = fut.result()
                    except NotFound:
                        pass  # removed since the listing
        with self._lock:
            for gone in set(self._stats) - set(names):
                del self._stats[gone]
        for name in names:
            if name in infos:
                yield infos[name]

    def stat(self, name: str) -> ImageInfo:
        check_name(name)
        info = self._cached(name, self._image_id(name))
        return info if info is not None else self._stat_fresh(name)

    def _acquire(self, name: str, version: str) -> _Handle:
        key = (name, version)
        with self._lock:
            h = self._handles.get(key)
            if h is not None:
                h.refs += 1
                self._handles.move_to_end(key)
                return h
        try:
            image = self._open_image(name)
        except NotFound:
            # Deleted (or renamed away) since the file was opened: that version is gone, as
            # after a replace (EIO), not a missing file (ENOENT) for an open descriptor.
            raise Changed(f"{self.id}/{name} was removed since it was opened") from None
        try:
            same = image.id() == version
        except Exception as e:
            self._close_image(image)
            raise self._err(e, f"{self.id}/{name}") from None
        if not same:
            self._close_image(image)
            raise Changed(f"{self.id}/{name} changed since it was opened")
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
            self._close_image(img)
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
            self._close_image(h.image)

    def read_range(self, name: str, version: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise BackendError(f"{self.id}/{name}: bad range {offset}+{length}")
        h = self._acquire(name, version)
        doom = False
        try:
            try:
                size = h.image.size()
                n = max(0, min(length, size - offset))
                data = h.image.read(offset, n) if n else b""
            except Exception as e:
                doom = True
                err = self._err(e, f"{self.id}/{name}: read at {offset}")
                raise (Changed(str(err)) if isinstance(err, NotFound) else err) from None
            if len(data) != n:
                doom = True
                raise BackendError(f"{self.id}/{name}: short read at {offset}: {len(data)} of "
                                   f"{n} bytes")
            # After the read: a handle on a deleted image reads zeros, so only a name that
            # still refers to this id proves the bytes are this version's.
            try:
                now = self._image_id(name)
            except NotFound:
                now = ""
            if now != version:
                doom = True
                raise Changed(f"{self.id}/{name} changed since it was opened")
            return data
        finally:
            self._release((name, version), h, doom)

    # ------------------------------------------------------------------ changes
    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnly(f"store {self.id} is read-only")

    def upload(self, name: str, size_hint: int | None = None) -> Upload:
        self._writable()
        check_name(name)
        self._conn()
        return RbdUpload(self, name, size_hint)

    def _check_no_clones(self, name: str, image: Any) -> None:
        """Busy if any snapshot of ``image`` has clones: they would lose their parent."""
        for snap in image.list_snaps():
            try:
                image.set_snap(snap["name"])
                children = list(image.list_children2())
            finally:
                image.set_snap(None)
            if children:
                which = ", ".join(
                    f"{c.get('pool', '?')}/{c.get('image', '?')}" for c in children[:5])
                log.warning("store %s: %s has clones of snapshot %s (%s): refusing to remove "
                            "or replace it", self.id, name, snap["name"], which)
                raise Busy(f"{self.id}/{name}: snapshot {snap['name']} has clones ({which})")

    def _foreign_snaps(self, name: str, image: Any) -> None:
        """Busy if ``image`` has snapshots imagefs did not make (only ``snap`` is ours)."""
        others = [s["name"] for s in image.list_snaps() if s["name"] != SNAP]
        if others:
            log.warning("store %s: %s has snapshots %s not made by imagefs: not removing or "
                        "replacing it", self.id, name, ", ".join(others[:5]))
            raise Busy(f"{self.id}/{name} has snapshots: {', '.join(others[:5])}")

    def _remove_image(self, name: str) -> None:
        """Remove an image and imagefs's ``snap``; never one with clones or other snapshots.

        Everything that can refuse is checked before anything is changed.
        """
        image = self._open_image(name, read_only=False)
        try:
            self._check_no_clones(name, image)
            self._foreign_snaps(name, image)
            if any(s["name"] == SNAP for s in image.list_snaps()):
                if image.is_protected_snap(SNAP):
                    image.unprotect_snap(SNAP)
                image.remove_snap(SNAP)
        except StoreError:
            raise
        except Exception as e:
            raise self._err(e, f"{self.id}/{name}: removing snapshot") from None
        finally:
            self._close_image(image)
        try:
            self.rbd.RBD().remove(self._conn(), name)
        except Exception as e:
            raise self._err(e, f"{self.id}/{name}: remove") from None

    def _rename(self, old: str, new: str) -> None:
        self.rbd.RBD().rename(self._conn(), old, new)

    def _id_or_none(self, name: str) -> str | None:
        """The id ``name`` refers to, or None if no image has that name."""
        try:
            return self._image_id(name)
        except NotFound:
            return None

    def _prepare_aside(self, dst: str) -> str:
        """Step 1's checks and tags on the image at ``dst``; returns its id.

        Busy if it must not be replaced: clones of a snapshot, snapshots imagefs did not make
        (it could not remove the old image afterwards), or watchers (a VM or ``rbd map`` uses
        it: removal would fail the same way). Read-only opens, like imagefs's, do not watch.
        """
        image = self._open_image(dst, read_only=False)
        try:
            self._check_no_clones(dst, image)
            self._foreign_snaps(dst, image)
            mine = str(self.cluster.get_addrs())  # our own read-write opens (this one too)
            # Another host replacing it at the same moment watches it while it runs this
            # very check (a read-write open): both refused, and neither image was published.
            # A VM's watch stays; that one goes within moments. Look again, at random times.
            patience = time.monotonic() + self.timeout / 4
            while watchers := [w for w in image.watchers_list()
                               if str(w.get("addr")) not in mine]:
                if time.monotonic() > patience:
                    log.warning("store %s: %s is in use (watched by %s): not replacing it",
                                self.id, dst,
                                ", ".join(str(w.get("addr")) for w in watchers[:5]))
                    raise Busy(f"{self.id}/{dst} is in use ({len(watchers)} watchers)")
                self._close_image(image)
                time.sleep(random.uniform(0.05, 0.5))
                image = self._open_image(dst, read_only=False)
            image.metadata_set(ASIDE_KEY, repr(time.time()))
            image.metadata_set(RESTORE_KEY, dst)
            return str(image.id())
        except StoreError:
            raise
        except Exception as e:
            raise self._err(e, f"{self.id}/{dst}: preparing replacement") from None
        finally:
            self._close_image(image)

    def _publish(self, src: str, dst: str, src_id: str | None = None) -> None:
        """Give image ``src`` the name ``dst``, replacing an image there (see module doc).

        After any failed rename the names are looked up again (``rbd_id.<name>``) before
        anything is rolled back or removed: a rename that timed out may have happened.
        """
        rbd = self.rbd
        if src_id is None:
            src_id = self._image_id(src)
        for _ in range(PUBLISH_TRIES):
            try:
                self._rename(src, dst)
                self._forget(dst)
                return
            except rbd.ImageExists:
                pass
            except Exception as e:
                if self._id_or_none(dst) == src_id:
                    self._forget(dst)
                    return  # it did happen
                raise self._err(e, f"{self.id}: rename {src} -> {dst}") from None
            if self._id_or_none(dst) == src_id:
                return  # an earlier attempt of ours did happen after all
            aside = f"{HIDDEN_PREFIX}{new_owner_id()}{OLD_SUFFIX}"
            try:
                old_id = self._prepare_aside(dst)
            except NotFound:
                continue  # removed meanwhile: try the plain rename again
            # (1) old image aside
            try:
                self._rename(dst, aside)
            except rbd.ImageNotFound:
                continue
            except Exception as e:
                if self._id_or_none(aside) != old_id:
                    self._clear_tags(dst, old_id)
                    raise self._err(e, f"{self.id}: rename {dst} aside") from None
            if self._id_or_none(aside) != old_id:
                # Another client replaced dst between our checks and the rename: what we moved
                # aside was not checked. Put it back and start over.
                self._put_back(aside, dst)
                continue
            # (2) new image in
            try:
                self._rename(src, dst)
            except Exception as e:
                now = self._id_or_none(dst)
                if now != src_id:
                    if now is None:
                        self._put_back(aside, dst)
                    else:
                        log.error("store %s: %s was published by someone else during a replace; "
                                  "the old image %s is left for cleanup", self.id, dst, aside)
                    raise self._err(e, f"{self.id}: rename {src} -> {dst}") from None
            self._forget(dst)
            # (3) the old image: untagged at once (a crash must not bring it back), then gone
            self._clear_tags(aside, old_id, restore_only=True)
            try:
                self._remove_image(aside)
            except StoreError as e:
                log.warning("store %s: replaced %s but could not remove its old image %s: %s",
                            self.id, dst, aside, e)
            return
        raise BackendError(f"{self.id}/{dst}: other clients kept replacing it; gave up",
                           retryable=True)

    def _put_back(self, aside: str, dst: str) -> None:
        """Undo step 1 (best effort: cleanup at the next mount restores it otherwise)."""
        try:
            self._rename(aside, dst)
        except Exception as e:
            log.error("store %s: could not put %s back after a failed replace (%s); it is kept "
                      "as %s and restored at next mount", self.id, dst, e, aside)
            return
        self._clear_tags(dst, None)

    def _clear_tags(self, name: str, image_id: str | None, restore_only: bool = False) -> None:
        """Remove the replace tags from image ``name`` (if it still is ``image_id``)."""
        try:
            image = self._open_image(name, read_only=False)
        except StoreError as e:
            log.debug("%s/%s: removing replace tags: %s", self.id, name, e)
            return
        try:
            if image_id is not None and image.id() != image_id:
                return
            for key in (RESTORE_KEY,) if restore_only else (RESTORE_KEY, ASIDE_KEY):
                try:
                    image.metadata_remove(key)
                except Exception as e:
                    log.debug("%s/%s: removing %s: %s", self.id, name, key, e)
        except Exception as e:
            log.debug("%s/%s: removing replace tags: %s", self.id, name, e)
        finally:
            self._close_image(image)

    def rename(self, old: str, new: str) -> ImageInfo:
        self._writable()
        check_name(old)
        check_name(new)
        if old != new:
            self._publish(old, new, self._image_id(old))  # NotFound before anything happens
            self._forget(old)
        return self._stat_fresh(new)

    def delete(self, name: str) -> None:
        self._writable()
        check_name(name)
        self._remove_image(name)
        self._forget(name)

    def set_meta(self, name: str, meta: Mapping[str, str], expect: str | None = None
                 ) -> ImageInfo:
        self._writable()
        check_name(name)
        image = self._open_image(name, read_only=False)
        try:
            if expect is not None and image.id() != expect:  # the handle pins the image
                raise Changed(f"{self.id}/{name} is no longer version {expect}")
            for key, value in user_meta(meta).items():
                image.metadata_set(META_PREFIX + key, value)
            info = self._info(name, image)
        except Exception as e:
            raise self._err(e, f"{self.id}/{name}: set metadata") from None
        finally:
            self._close_image(image)
        self._remember(info)
        return info

    def location(self, name: str) -> str:
        """Glance's ``rbd://fsid/pool/image/snap``, for images that have that snapshot (may
        read the image: call from a worker thread); ``Unsupported`` otherwise, since
        glance_store has no form for them (see the module docstring)."""
        if self.namespace:
            raise Unsupported(f"store {self.id} uses RBD namespace {self.namespace!r}, which "
                              f"Glance's rbd:// locations cannot name")
        if not self._has_glance_snap(name):
            raise Unsupported(f"{self.id}/{name} has no snapshot {SNAP!r}, which is what "
                              f"Glance reads (a glance_layout store makes it at publish)")
        parts = [self.fsid, self.pool, name, SNAP]
        return "rbd://" + "/".join(urllib.parse.quote(p, safe="") for p in parts)

    # ------------------------------------------------------------------ housekeeping
    def _dead(self, name: str) -> bool:
        """True if the upload/aside image ``name`` belongs to a process that is gone."""
        state = owner_state(name[len(HIDDEN_PREFIX):].removesuffix(OLD_SUFFIX))
        if state != "elsewhere":
            return state == "dead"
        if self.leftover_age <= 0:
            return False
        try:
            image = self._open_image(name)
        except NotFound:
            return False
        try:
            since = None
            if name.endswith(OLD_SUFFIX):
                try:  # moved aside at: the image itself may be years old
                    since = float(image.metadata_get(ASIDE_KEY))
                except Exception:
                    since = None  # moved aside by an older imagefs: only its age is known
            if since is None:
                since = _timestamp(image.create_timestamp())
        finally:
            self._close_image(image)
        return time.time() - since > self.leftover_age

    def cleanup_leftovers(self) -> int:
        """Remove uploads of dead writers; put back images a crash left moved aside."""
        if self.read_only:
            return 0
        try:
            names = [e["name"] for e in self.rbd.RBD().list2(self._conn())]
        except Exception as e:
            raise self._err(e, f"store {self.id}: listing pool {self.pool}") from None
        done = 0
        for name in names:
            if not is_hidden(name) or not self._dead(name):
                continue
            try:
                if name.endswith(OLD_SUFFIX) and self._restore(name):
                    done += 1
                    continue
                self._remove_image(name)
                done += 1
                log.info("store %s: removed leftover image %s", self.id, name)
            except StoreError as e:
                log.warning("store %s: could not clean up leftover image %s: %s",
                            self.id, name, e)
        return done

    def _restore(self, aside: str) -> bool:
        """Rename an image moved aside by a crashed replace back, if its name is free."""
        image = self._open_image(aside)
        try:
            target = image.metadata_get(RESTORE_KEY)
        except Exception:
            return False
        finally:
            self._close_image(image)
        for attempt in range(2):
            try:
                self._rename(aside, target)
                break
            except self.rbd.ImageExists:
                if attempt or not self._drop_stale_id(target):
                    return False  # the replacement was published: the old one is garbage
            except Exception as e:
                raise self._err(e, f"{self.id}: restoring {target}") from None
        self._clear_tags(target, None)
        log.warning("store %s: restored %s, left moved aside by a crash during a replace",
                    self.id, target)
        return True

    def _drop_stale_id(self, name: str) -> bool:
        """Remove ``rbd_id.<name>`` if no image of that name is in the pool's directory.

        librbd renames in several RADOS writes (the new id object, the directory, then the old
        id object removed). A process killed between them leaves an id object that only
        blocks the name: the directory lists the image under the other name, and a rename
        back fails with "exists". Seen killing a daemon mid-replace: the old image's restore
        failed that way and the image was then removed as garbage. A rename in progress in
        another live client has the same look for a moment, so the directory is read twice,
        a second apart. Returns True if it removed one."""
        def listed() -> bool:
            return any(e["name"] == name for e in self.rbd.RBD().list2(self._conn()))

        try:
            if listed():
                return False
            time.sleep(1.0)
            if listed():
                return False
            self._conn().remove_object("rbd_id." + name)
        except Exception as e:
            raise self._err(e, f"{self.id}/{name}: removing a stale id object") from None
        log.warning("store %s: removed rbd_id.%s, left without its image by a rename that was "
                    "cut short", self.id, name)
        return True

    def usage(self) -> tuple[int, int] | None:
        images = list(self.list())
        return len(images), sum(i.size for i in images)

    def properties(self) -> dict[str, str]:
        props = {"fsid": self.fsid, "pool": self.pool, "user": self.user,
                 "glance_layout": "true" if self.glance_layout else "false"}
        if self.namespace:
            props["namespace"] = self.namespace
        return props
