"""``type = "rbd"``: images are RBD images in one Ceph pool (optionally one RBD namespace).

This is how Glance and Nova keep images, so hypervisors using Ceph directly see the same images.
Each store has its own cluster connection (``conf``, ``user``, ``keyring``), so one mount can
serve several clusters, and several pools of one cluster, at once.

Connection
    One ``rados.Rados`` per store, opened in ``open()`` and kept for the life of the mount;
    librados reconnects to monitors and resends to OSDs by itself after transient errors.
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
    complete image, with its snapshot already there.

Replacing an existing image (commit or rename onto an existing name)
    RBD cannot rename over an existing image, so replacement is three steps:
    (1) tag the old image with ``imagefs.restore_name`` and rename it to a hidden ``...-old``
    name; (2) rename the new image to the name; (3) delete the old one. If (2) fails the old image
    is renamed back. A crash between (1) and (2) leaves the old image hidden but intact, and
    ``cleanup_leftovers`` renames it back (the tag says where) if the name is still free; a crash
    after (2) leaves a hidden old image that cleanup deletes. So a crash never loses the published
    image, and no reader ever sees a partial one; the price is a short window between (1) and (2)
    where a fresh lookup by another client finds no image. The alternative order (new in first)
    is impossible without an atomic rename-over. An image whose ``snap`` has clones is never
    replaced or deleted: ``Busy`` (EBUSY) and a log line.

Versions and reads
    ``version`` is the RBD image id: every upload is a new image, so new bytes mean a new id,
    while renames and metadata changes keep it. Bytes written in place by other tools (``rbd map``
    + dd) are not seen as a change: Glance treats images as immutable, and so does this store.
    ``read_range`` keeps a small pool of read-only ``Image`` handles per (name, id) and, *after*
    each read, re-reads ``rbd_id.<name>`` (one tiny RADOS read) to check the name still refers to
    that id. The check must come after the read: librbd returns zeros, not an error, from a handle
    on an image that was deleted meanwhile, so an unchecked read of a replaced image could mix old
    bytes with zeros. (``rbd_id.<name>`` is the format-2 name→id object librbd itself uses.)

Listing and stat cache
    ``list()`` gets names and ids in one call (``list2``); the per-image facts (size, metadata)
    need an image open each (up to 8 at once), so they are cached per (name, id) for ``stat_ttl``
    seconds, on top of the mount's own ``metadata_ttl`` catalog. A replaced image has a new id,
    so the cache can only be stale about changes made by *other* clients to metadata
    (mtime/mode/hashes) or to size in place, and only for ``stat_ttl``. imagefs's own changes
    update it at once. ``stat()`` of a cached image costs one small read (``rbd_id.<name>``).

Locations
    glance_layout: ``rbd://<fsid>/<pool>/<image>/snap``, exactly what Glance records (it cannot
    express RBD namespaces, hence glance_layout and namespace exclude each other).
    Otherwise ``rbd://<fsid>/<pool>/<image>``, or ``rbd://<fsid>/<pool>/<namespace>/<image>``
    with a namespace: the image spec of the ``rbd`` CLI after the cluster fsid. Each part is
    percent-encoded.
"""

from __future__ import annotations

import calendar
import concurrent.futures
import errno
import logging
import struct
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

from imagefs.config import Option
from imagefs.stores.base import (
    HIDDEN_PREFIX,
    BackendError,
    Busy,
    Changed,
    ImageInfo,
    NoSpace,
    NotFound,
    OptionError,
    ReadOnly,
    Store,
    StoreError,
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
    """A hidden image being written; becomes visible only in ``commit``."""

    def __init__(self, store: RbdStore, name: str, size_hint: int | None) -> None:
        self.store = store
        self.name = name
        tmp = f"{HIDDEN_PREFIX}{new_owner_id()}"
        #: The hidden image's name; None once published (or removed): nothing left to clean.
        self.tmp: str | None = tmp
        self.size = 0  # the logical size: what commit publishes
        self.capacity = size_hint or 0  # the image's actual size, ahead of ``size`` on growth
        self.image: Any = None
        rbd = store.rbd
        try:
            rbd.RBD().create(store.ioctx, tmp, self.capacity)
        except Exception as e:
            raise _fail(e, f"{store.id}: cannot create upload image for {name}") from None
        try:
            self.image = rbd.Image(store.ioctx, tmp)
            # librbd keeps its cache writethrough until the first flush it sees
            # (rbd_cache_writethrough_until_flush): FUSE hands over 128 KiB writes, each then a
            # synchronous OSD round trip. An empty flush now switches to writeback; commit
            # flushes before the image gets its name, so nothing unflushed is ever published.
            self.image.flush()
        except Exception as e:
            self._remove_tmp()
            raise _fail(e, f"{store.id}: cannot open upload image for {name}") from None

    def _img(self) -> Any:
        if self.image is None:
            raise BackendError(f"{self.store.id}/{self.name}: upload already finished")
        return self.image

    def _grow(self, end: int) -> None:
        if end <= self.capacity:
            return
        want = max(end, self.capacity + min(self.capacity, GROW_MAX))
        want = -(-want // GROW_ALIGN) * GROW_ALIGN
        self._img().resize(want)
        self.capacity = want

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        end = offset + len(data)
        try:
            self._grow(end)
            img = self._img()
            if _all_zero(data):
                img.write_zeroes(offset, len(data))  # allocates nothing where nothing is
            else:
                n = img.write(data, offset)
                if n != len(data):
                    raise BackendError(f"short write: {n} of {len(data)} bytes")
        except Exception as e:
            raise _fail(e, f"{self.store.id}/{self.name}: write at {offset}") from None
        self.size = max(self.size, end)

    def read(self, offset: int, length: int) -> bytes:
        n = max(0, min(length, self.size - offset))
        if n == 0:
            return b""
        try:
            data = self._img().read(offset, n)
        except Exception as e:
            raise _fail(e, f"{self.store.id}/{self.name}: read at {offset}") from None
        return data + bytes(n - len(data))

    def truncate(self, size: int) -> None:
        try:
            if size < self.capacity:
                # Shrinking drops the bytes past ``size``; growing later reads zeros there.
                self._img().resize(size)
                self.capacity = size
            else:
                self._grow(size)
        except Exception as e:
            raise _fail(e, f"{self.store.id}/{self.name}: truncate to {size}") from None
        self.size = size

    def flush(self) -> None:
        try:
            self._img().flush()
        except Exception as e:
            raise _fail(e, f"{self.store.id}/{self.name}: flush") from None

    def commit(self, meta: Mapping[str, str]) -> ImageInfo:
        store = self.store
        img = self._img()
        try:
            if self.capacity != self.size:
                img.resize(self.size)
                self.capacity = self.size
            stored = user_meta(meta)
            for key, value in stored.items():
                img.metadata_set(META_PREFIX + key, value)
            img.flush()
            if store.glance_layout:
                img.create_snap(SNAP)
                img.protect_snap(SNAP)
            image_id = img.id()
            created = _timestamp(img.create_timestamp())
            img.close()
            self.image = None
            assert self.tmp is not None
            store._publish(self.tmp, self.name)
            self.tmp = None
        except Exception as e:
            self.abort()
            raise _fail(e, f"{store.id}/{self.name}: publish") from None
        info = ImageInfo(name=self.name, size=self.size, mtime=meta_mtime(stored, created),
                         mode=meta_mode(stored), version=image_id, meta=stored)
        store._remember(info)
        return info

    def _remove_tmp(self) -> None:
        if self.tmp is None:
            return
        try:
            self.store._remove_image(self.tmp)
        except NotFound:
            pass
        except StoreError as e:
            log.warning("%s: could not remove upload image %s: %s (removed at next mount)",
                        self.store.id, self.tmp, e)

    def abort(self) -> None:
        img, self.image = self.image, None
        if img is not None:
            try:
                img.close()
            except Exception as e:
                log.debug("%s: closing upload image %s: %s", self.store.id, self.tmp, e)
        self._remove_tmp()
        self.tmp = None


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
    capabilities = frozenset({"random_write", "rename"})

    def __init__(self, cfg: Any) -> None:
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
        self.ioctx: Any = None
        self.rados: Any = None
        self.rbd: Any = None
        self._stats: dict[str, tuple[float, ImageInfo]] = {}
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
        self.cluster, self.ioctx = cluster, ioctx
        log.info("store %s: connected to cluster %s, pool %s%s", self.id, self.fsid, self.pool,
                 f", namespace {self.namespace}" if self.namespace else "")

    def close(self) -> None:
        with self._lock:
            handles, self._handles = list(self._handles.values()), OrderedDict()
        for h in handles:
            h.doomed = True
            if h.refs == 0:
                self._close_image(h.image)
        if self.ioctx is not None:
            self.ioctx.close()
            self.ioctx = None
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None

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
            raise _fail(e, f"{self.id}/{name}") from None
        if len(raw) < 4:
            raise BackendError(f"{self.id}/{name}: malformed rbd_id object")
        (n,) = struct.unpack_from("<I", raw)
        return raw[4:4 + n].decode()

    def _open_image(self, name: str, read_only: bool = True) -> Any:
        try:
            return self.rbd.Image(self._conn(), name, read_only=read_only)
        except Exception as e:
            raise _fail(e, f"{self.id}/{name}") from None

    @staticmethod
    def _close_image(image: Any) -> None:
        try:
            image.close()
        except Exception as e:
            log.debug("closing an rbd image: %s", e)

    def _info(self, name: str, image: Any) -> ImageInfo:
        meta = {k[len(META_PREFIX):]: v for k, v in image.metadata_list()
                if k.startswith(META_PREFIX) and k != RESTORE_KEY}
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

    def _stat_fresh(self, name: str) -> ImageInfo:
        image = self._open_image(name)
        try:
            info = self._info(name, image)
        except Exception as e:
            raise _fail(e, f"{self.id}/{name}") from None
        finally:
            self._close_image(image)
        self._remember(info)
        return info

    # ------------------------------------------------------------------ reading
    def list(self) -> Iterator[ImageInfo]:
        try:
            entries = [(e["name"], e["id"]) for e in self.rbd.RBD().list2(self._conn())]
        except Exception as e:
            raise _fail(e, f"store {self.id}: listing pool {self.pool}") from None
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
        image = self._open_image(name)
        try:
            same = image.id() == version
        except Exception as e:
            self._close_image(image)
            raise _fail(e, f"{self.id}/{name}") from None
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
                err = _fail(e, f"{self.id}/{name}: read at {offset}")
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

    def _remove_image(self, name: str) -> None:
        """Remove an image and imagefs's ``snap``; never one with clones or other snapshots."""
        image = self._open_image(name, read_only=False)
        try:
            self._check_no_clones(name, image)
            snaps = [s["name"] for s in image.list_snaps()]
            if SNAP in snaps:
                if image.is_protected_snap(SNAP):
                    image.unprotect_snap(SNAP)
                image.remove_snap(SNAP)
            others = [s for s in snaps if s != SNAP]
            if others:
                log.warning("store %s: %s has snapshots %s not made by imagefs: not removing it",
                            self.id, name, ", ".join(others[:5]))
                raise Busy(f"{self.id}/{name} has snapshots: {', '.join(others[:5])}")
        except StoreError:
            raise
        except Exception as e:
            raise _fail(e, f"{self.id}/{name}: removing snapshot") from None
        finally:
            self._close_image(image)
        try:
            self.rbd.RBD().remove(self._conn(), name)
        except Exception as e:
            raise _fail(e, f"{self.id}/{name}: remove") from None

    def _rename(self, old: str, new: str) -> None:
        self.rbd.RBD().rename(self._conn(), old, new)

    def _publish(self, src: str, dst: str) -> None:
        """Give image ``src`` the name ``dst``, replacing an image there (see module doc)."""
        rbd = self.rbd
        for _ in range(PUBLISH_TRIES):
            try:
                self._rename(src, dst)
                self._forget(dst)
                return
            except rbd.ImageExists:
                pass
            except Exception as e:
                raise _fail(e, f"{self.id}: rename {src} -> {dst}") from None
            aside = f"{HIDDEN_PREFIX}{new_owner_id()}{OLD_SUFFIX}"
            try:
                image = self._open_image(dst, read_only=False)
            except NotFound:
                continue  # removed meanwhile: try the plain rename again
            try:
                self._check_no_clones(dst, image)
                image.metadata_set(RESTORE_KEY, dst)
            except StoreError:
                raise
            except Exception as e:
                raise _fail(e, f"{self.id}/{dst}: preparing replacement") from None
            finally:
                self._close_image(image)
            try:
                self._rename(dst, aside)
            except rbd.ImageNotFound:
                continue
            except Exception as e:
                raise _fail(e, f"{self.id}: rename {dst} aside") from None
            try:
                self._rename(src, dst)
            except Exception as e:
                try:
                    self._rename(aside, dst)
                    self._clear_restore_tag(dst)
                except Exception as e2:
                    log.error("store %s: could not put %s back after a failed replace (%s); it "
                              "is kept as %s and restored at next mount", self.id, dst, e2, aside)
                raise _fail(e, f"{self.id}: rename {src} -> {dst}") from None
            self._forget(dst)
            try:
                self._remove_image(aside)
            except StoreError as e:
                log.warning("store %s: replaced %s but could not remove its old image %s: %s",
                            self.id, dst, aside, e)
            return
        raise BackendError(f"{self.id}/{dst}: other clients kept replacing it; gave up",
                           retryable=True)

    def _clear_restore_tag(self, name: str) -> None:
        image = self._open_image(name, read_only=False)
        try:
            image.metadata_remove(RESTORE_KEY)
        except Exception as e:
            log.debug("%s/%s: removing %s: %s", self.id, name, RESTORE_KEY, e)
        finally:
            self._close_image(image)

    def rename(self, old: str, new: str) -> ImageInfo:
        self._writable()
        check_name(old)
        check_name(new)
        if old != new:
            self._image_id(old)  # NotFound before anything else happens
            self._publish(old, new)
            self._forget(old)
        return self._stat_fresh(new)

    def delete(self, name: str) -> None:
        self._writable()
        check_name(name)
        self._remove_image(name)
        self._forget(name)

    def set_meta(self, name: str, meta: Mapping[str, str]) -> ImageInfo:
        self._writable()
        check_name(name)
        image = self._open_image(name, read_only=False)
        try:
            for key, value in user_meta(meta).items():
                image.metadata_set(META_PREFIX + key, value)
            info = self._info(name, image)
        except Exception as e:
            raise _fail(e, f"{self.id}/{name}: set metadata") from None
        finally:
            self._close_image(image)
        self._remember(info)
        return info

    def location(self, name: str) -> str:
        parts = [self.fsid, self.pool]
        if self.namespace:
            parts.append(self.namespace)
        parts.append(name)
        if self.glance_layout:
            parts.append(SNAP)
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
            age = time.time() - _timestamp(image.create_timestamp())
        finally:
            self._close_image(image)
        return age > self.leftover_age

    def cleanup_leftovers(self) -> int:
        """Remove uploads of dead writers; put back images a crash left moved aside."""
        if self.read_only:
            return 0
        try:
            names = [e["name"] for e in self.rbd.RBD().list2(self._conn())]
        except Exception as e:
            raise _fail(e, f"store {self.id}: listing pool {self.pool}") from None
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
        try:
            self._rename(aside, target)
        except self.rbd.ImageExists:
            return False  # the replacement was published: the old one is garbage
        except Exception as e:
            raise _fail(e, f"{self.id}: restoring {target}") from None
        self._clear_restore_tag(target)
        log.warning("store %s: restored %s, left moved aside by a crash during a replace",
                    self.id, target)
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
