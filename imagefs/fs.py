"""The FUSE operations: root = one directory per store, images = files.

This module knows inodes, names and errno values, and no backend: stores are reached only
through the ``Store`` interface (via ``bridge``), readers and writers. Store exceptions become
errno values here and nowhere else, and every error that is not the caller's own mistake is
logged with the store and image it concerns.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import pyfuse3
import trio

from imagefs import bridge, stats
from imagefs.background_hash import BackgroundHasher
from imagefs.catalog import Catalog
from imagefs.hashing import META_VALUE, parse_hashes
from imagefs.inodes import ROOT, InodeTable, Node
from imagefs.procfs import has_sys_admin, killed_by, process_of, still_open_by
from imagefs.reader import BlockSource, Reader
from imagefs.stores.base import (
    META_GID,
    META_MODE,
    META_MTIME,
    META_UID,
    BackendError,
    Busy,
    Changed,
    ImageInfo,
    InvalidName,
    NoSpace,
    NotFound,
    ReadOnly,
    Store,
    StoreError,
    Unsupported,
    check_name,
)
from imagefs.writer import Writer, WriterSettings

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
T = TypeVar("T")

_ERRNO: dict[type[StoreError], int] = {
    NotFound: errno.ENOENT,
    ReadOnly: errno.EROFS,
    NoSpace: errno.ENOSPC,
    Busy: errno.EBUSY,
    InvalidName: errno.EINVAL,
    Unsupported: errno.EOPNOTSUPP,
    Changed: errno.EIO,
    BackendError: errno.EIO,
}
_QUIET = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.EXDEV, errno.EROFS,
          errno.EOPNOTSUPP, errno.ENODATA, errno.EPERM, errno.EINVAL, errno.ENAMETOOLONG,
          errno.EISDIR, errno.ENOTDIR, errno.EACCES}


_SETTABLE_META = ("os_hash_algo", "os_hash_value", "checksum")
#: The location glance_store can use, credentials included where its driver needs them (S3):
#: in the ``trusted.`` namespace, which the kernel lets only CAP_SYS_ADMIN read or list.
GLANCE_XATTR = "trusted.imagefs.glance_location"
_LOCATION = "user.imagefs.location"


def errno_of(e: BaseException) -> int:
    for cls in type(e).__mro__:
        if cls in _ERRNO:
            return _ERRNO[cls]  # type: ignore[index]
    if isinstance(e, OSError) and e.errno:
        return e.errno
    return errno.EIO


def fuse_errors(fn: F) -> F:
    """Turn store and OS errors into FUSEError, logging the ones an operator must see."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except trio.Cancelled:
            raise
        except Exception as e:
            code = errno_of(e)
            if code in _QUIET:
                log.debug("%s: %s (%s)", fn.__name__, errno.errorcode.get(code), e)
            elif isinstance(e, StoreError | OSError):
                log.error("%s failed: %s: %s", fn.__name__, errno.errorcode.get(code, code), e)
            else:
                log.exception("%s failed unexpectedly", fn.__name__)
            raise pyfuse3.FUSEError(code) from None

    return wrapper  # type: ignore[return-value]


def _decode(name: bytes) -> str:
    return name.decode("utf-8", "surrogateescape")


@dataclass
class Handle:
    node: Node
    store: Store
    reader: Reader | None = None
    writer: Writer | None = None
    pid: int = 0  # the process that opened it
    #: A reader whose reads the kernel serves from its page cache, capped at the inode's size.
    cached: bool = False


async def caller_process(ctx: Any) -> int:
    """The process making a FUSE request (read from /proc off the trio thread)."""
    return await bridge.local(process_of, ctx.pid)


@dataclass(frozen=True)
class FsSettings:
    ttl: float
    readahead: int
    writer: WriterSettings
    uid: int
    gid: int
    read_only: bool = False
    mountpoint: str = ""
    #: Readers go through the kernel's page cache (kept across opens of an unchanged image)
    #: instead of direct I/O; see ``cache.page_cache`` in imagefs.toml(5).
    page_cache: bool = True


class ImageFS(pyfuse3.Operations):
    """pyfuse3 operations over a set of opened stores."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, stores: list[Store], source_factory: Callable[[trio.Nursery], BlockSource],
                 settings: FsSettings) -> None:
        super().__init__()
        self.stores = {s.id: s for s in stores}
        self.order = [s.id for s in stores]
        self.settings = settings
        self.inodes = InodeTable(self.order)
        self.catalogs = {s.id: Catalog(s, settings.ttl) for s in stores}
        self.default_id = next((s.id for s in stores if s.default), None)
        self._source_factory = source_factory
        self.source: BlockSource | None = None
        self.nursery: trio.Nursery | None = None
        self.background_hash: BackgroundHasher | None = None
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._dir_listings: dict[int, list[tuple[bytes, Any]]] = {}
        self._started = time.time_ns()
        self._dir_overrides: dict[int, dict[str, int]] = {}

    def bind(self, nursery: trio.Nursery) -> None:
        """Attach the nursery that background work (prefetch, streaming uploads) runs in."""
        self.nursery = nursery
        self.source = self._source_factory(nursery)
        ws = self.settings.writer
        self.background_hash = BackgroundHasher(ws.hash_algo, ws.hash_background_max,
                                                ws.long_timeout, self._hashed)
        nursery.start_soon(self.background_hash.run)

    def _hashed(self, store: Store, info: ImageInfo) -> None:
        """The background hasher stored an image's hashes: show them."""
        self.catalogs[store.id].put(info)
        node = self.inodes.find(store.id, info.name)
        if node is not None:
            node.extra["info"] = info

    # ------------------------------------------------------------------ attributes
    def _base_attr(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_uid = self.settings.uid
        a.st_gid = self.settings.gid
        a.entry_timeout = self.settings.ttl
        a.attr_timeout = self.settings.ttl
        a.st_blksize = 1 << 20
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self._started
        return a

    def _read_only(self, store: Store) -> bool:
        return store.read_only or self.settings.read_only

    def _dir_attr(self, ino: int, store: Store | None) -> pyfuse3.EntryAttributes:
        a = self._base_attr(ino)
        writable = store is not None and not self._read_only(store)
        a.st_mode = stat.S_IFDIR | (0o755 if writable else 0o555)
        a.st_nlink = 2
        over = self._dir_overrides.get(ino)
        if over:
            if "mtime_ns" in over:
                a.st_mtime_ns = a.st_ctime_ns = over["mtime_ns"]
            if "mode" in over:
                a.st_mode = stat.S_IFDIR | over["mode"]
        return a

    def _link_attr(self) -> pyfuse3.EntryAttributes:
        a = self._base_attr(self.inodes.default_link)
        a.st_mode = stat.S_IFLNK | 0o777
        a.st_nlink = 1
        a.st_size = len(self.default_id or "")
        return a

    def _image_attr(self, node: Node, info: ImageInfo) -> pyfuse3.EntryAttributes:
        a = self._base_attr(node.ino)
        mode = info.mode
        if self._read_only(self.stores[node.store_id]):
            mode &= ~0o222
        a.st_mode = stat.S_IFREG | (mode & 0o7777)
        a.st_nlink = 1 if node.name is not None else 0
        # The kernel ends page-cache reads at st_size: never below the version an open
        # page-cache reader holds (the image was replaced by a smaller one elsewhere; that
        # reader must get its bytes or EIO, not an early EOF).
        a.st_size = max([info.size, *self._cached_sizes(node)])
        a.st_blocks = (info.size + 511) // 512
        node.reported_version = info.version
        for key, field_ in ((META_UID, "st_uid"), (META_GID, "st_gid")):
            if key in info.meta and info.meta[key].isdigit():
                setattr(a, field_, int(info.meta[key]))
        ns = int(info.mtime * 1e9)
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = ns
        return a

    def _owner_change(self, node: Node, store: Store, attr: pyfuse3.EntryAttributes,
                      fields: Any) -> dict[str, str]:
        """chown/chgrp: the metadata to keep, as the store's ``chown`` setting says."""
        shown = self._image_attr(node, node.extra["info"]) if node.extra.get("info") else None
        uid = shown.st_uid if shown else self.settings.uid
        gid = shown.st_gid if shown else self.settings.gid
        change = {}
        if fields.update_uid and attr.st_uid != uid:
            change[META_UID] = str(attr.st_uid)
        if fields.update_gid and attr.st_gid != gid:
            change[META_GID] = str(attr.st_gid)
        if not change or store.chown == "keep":
            return change
        if store.chown == "ignore":
            return {}
        log.debug("%s/%s: chown refused (store setting chown = \"refuse\")", store.id,
                  node.name)
        raise pyfuse3.FUSEError(errno.EPERM)

    def _writer_attr(self, node: Node, w: Writer) -> pyfuse3.EntryAttributes:
        mtime = w.mtime if w.mtime is not None else time.time()
        info = ImageInfo(name=w.name, size=w.size, mtime=mtime, mode=w.mode,
                         meta=dict(w.owner))
        a = self._image_attr(node, info)
        a.entry_timeout = a.attr_timeout = 0
        return a

    def _store_of_dir(self, ino: int) -> Store:
        sid = self.inodes.ino_store.get(ino)
        if sid is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR if ino in self._all_known(ino) else errno.ENOENT)
        return self.stores[sid]

    def _all_known(self, ino: int) -> set[int]:
        return {ino} if self.inodes.node(ino) or ino == self.inodes.default_link else set()

    async def _attr_of(self, node: Node) -> pyfuse3.EntryAttributes:
        w = node.writer
        if (isinstance(w, Writer) and node.name is not None
                and (w.existed or w.published is not None)
                and (w.doomed or node.readers)):
            # A published image is behind the name while new bytes are pending, and someone
            # reads it: readers take the size from stat (qemu) and the kernel ends their reads
            # there, so it never drops below the published size; a growing writer's shows.
            try:
                info = await self.catalogs[node.store_id].stat(node.name)
            except NotFound:
                info = None
            if info is not None:
                node.extra["info"] = info
                a = self._image_attr(node, info)
                if w.dirty and not w.doomed and w.size > info.size:
                    a.st_size = w.size
                a.entry_timeout = a.attr_timeout = 0
                return a
        if isinstance(w, Writer) and (w.dirty or w.published is None and w.base is None):
            return self._writer_attr(node, w)
        if node.name is None:
            info = node.extra.get("info")
            if info is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._image_attr(node, info)
        info = await self.catalogs[node.store_id].stat(node.name)
        node.extra["info"] = info
        return self._image_attr(node, info)

    # ------------------------------------------------------------------ lookup & attrs
    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None
                     ) -> pyfuse3.EntryAttributes:
        text = _decode(name)
        if parent_inode == ROOT:
            if text in self.inodes.store_ino:
                sid = text
                return self._dir_attr(self.inodes.store_ino[sid], self.stores[sid])
            if text == "default" and self.default_id:
                return self._link_attr()
            raise pyfuse3.FUSEError(errno.ENOENT)
        store = self._store_of_dir(parent_inode)
        try:
            check_name(text)
        except InvalidName:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        node = self.inodes.find(store.id, text)
        if node is not None and self._pending(node):
            # Still being written and never published: nobody may see it under its name yet,
            # except the writing process itself (stat, rename or unlink of its own new file).
            w = node.writer
            assert isinstance(w, Writer)
            if ctx is not None and await caller_process(ctx) in self._writer_pids(w):
                self.inodes.looked_up(node)
                return self._writer_attr(node, w)
            raise pyfuse3.FUSEError(errno.ENOENT)
        info = await self.catalogs[store.id].stat(text)
        node = self.inodes.get(store.id, text)
        node.extra["info"] = info
        attr = (await self._attr_of(node) if isinstance(node.writer, Writer)
                else self._image_attr(node, info))
        self.inodes.looked_up(node)
        return attr

    @staticmethod
    def _joinable_writer(node: Node) -> Writer | None:
        """The writer a new write handle on ``node`` shares, or None to start a new one.

        A writer whose pending bytes are lost (a write or publish failed, or it was
        discarded) is left to the handles that have it: they can only fail. A new open
        starts afresh, or every later close of the image would fail too."""
        w = node.writer
        if not isinstance(w, Writer):
            return None
        if w.private:
            raise pyfuse3.FUSEError(errno.EBUSY)  # truncate(2) in progress
        assert not w.closing, "callers wait for a closing writer first (_settled_writer)"
        return None if w.lost else w

    @staticmethod
    async def _settled_writer(node: Node) -> Writer | None:
        """``node``'s writer once no release is under way on it.

        The last close of a writer publishes, then discards its spool or upload; a handle
        joining it meanwhile would write into a discarded spool and publish zeros (fsx -c,
        qemu-img reopening a file). Whoever would join, change or replace ``node``'s writer
        waits here, then starts from what that release published."""
        while isinstance(node.writer, Writer) and node.writer.closing:
            await node.writer.closed.wait()
        return node.writer if isinstance(node.writer, Writer) else None

    @staticmethod
    def _closing(node: Node) -> bool:
        return isinstance(node.writer, Writer) and node.writer.closing

    async def _between_releases(self, node: Node, step: Callable[[], Awaitable[T]]) -> T:
        """Run ``step`` (a lookup that awaits) until no release of ``node``'s writer began
        while it ran, so what it found still holds while the caller goes on without an
        await (see ``_settled_writer``)."""
        while True:
            await self._settled_writer(node)
            result = await step()
            if not self._closing(node):
                return result

    @staticmethod
    def _cached_sizes(node: Node) -> list[int]:
        """Sizes of the versions ``node``'s page-cache readers hold."""
        return [h.reader.info.size for h in node.readers if h.cached]

    def _refuse_shrink_under_readers(self, node: Node, size: int, what: str) -> None:
        """ETXTBSY for making an image smaller than a version its page-cache readers read.

        The kernel takes the new size at once (O_TRUNC: 0) and stops those readers there: they
        would see the end of the image and copy it short, without an error. Replacing with a
        new file renamed over the old (rsync's way) is safe: readers keep their version."""
        if size < max(self._cached_sizes(node), default=0):
            log.warning("%s/%s: %s refused (ETXTBSY): the image is open for reading; write a "
                        "new file and rename it over instead", node.store_id, node.name, what)
            raise pyfuse3.FUSEError(errno.ETXTBSY)

    def _writer_pids(self, w: Writer) -> set[int]:
        """The processes holding ``w`` open for writing."""
        return {h.pid for h in self._handles.values() if h.writer is w and h.pid}

    @staticmethod
    def _pending(node: Node) -> bool:
        """A new image being written: nothing is published under its name yet."""
        w = node.writer
        return isinstance(w, Writer) and not w.existed and w.published is None

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            self.inodes.forget(ino, count)

    @fuse_errors
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if inode == ROOT:
            return self._dir_attr(ROOT, None)
        if inode in self.inodes.ino_store:
            sid = self.inodes.ino_store[inode]
            return self._dir_attr(inode, self.stores[sid])
        if inode == self.inodes.default_link and self.default_id:
            return self._link_attr()
        node = self.inodes.node(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self._attr_of(node)

    @fuse_errors
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        if inode == self.inodes.default_link and self.default_id:
            return self.default_id.encode()
        raise pyfuse3.FUSEError(errno.EINVAL)

    @fuse_errors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: Any,
                      fh: int | None, ctx: Any) -> pyfuse3.EntryAttributes:
        node = self.inodes.node(inode)
        if node is None:
            if inode in self.inodes.ino_store and not (
                    fields.update_size or fields.update_uid or fields.update_gid):
                return self._set_dir_attr(inode, attr, fields)
            if inode == ROOT or inode in self.inodes.ino_store:
                raise pyfuse3.FUSEError(errno.EPERM)
            raise pyfuse3.FUSEError(errno.ENOENT)
        store = self.stores[node.store_id]
        if self._read_only(store) and (fields.update_size or fields.update_mode
                                       or fields.update_mtime or fields.update_uid
                                       or fields.update_gid):
            # Before the chown policy: a read-only store refuses every change with EROFS, as
            # a read-only file system does (not EPERM for a chown that "refuse" would refuse).
            raise pyfuse3.FUSEError(errno.EROFS)
        owner = self._owner_change(node, store, attr, fields)
        own = self._handles.get(fh) if fh is not None else None
        w = own.writer if own is not None and own.writer is not None else \
            await self._settled_writer(node)
        if fields.update_size:
            self._refuse_shrink_under_readers(node, attr.st_size, "truncate")
            if w is None:
                await self._truncate_published(node, store, attr.st_size)
            else:
                try:
                    await w.truncate(attr.st_size)
                except NotFound as e:
                    if own is None:
                        raise
                    raise Changed(f"{store.id}: {e}") from None  # ftruncate(2): see read
        meta: dict[str, str] = {}
        if fields.update_mode:
            meta[META_MODE] = f"{attr.st_mode & 0o7777:o}"
        if fields.update_mtime:
            meta[META_MTIME] = repr(attr.st_mtime_ns / 1e9)
        meta.update(owner)
        if meta:
            if w is not None and (w.dirty or w.published is None):
                if fields.update_mode:
                    w.mode = attr.st_mode
                if fields.update_mtime:
                    w.mtime = attr.st_mtime_ns / 1e9
                w.owner.update(owner)
            elif node.name is not None:
                await self._set_meta(node, store, meta)
        return await self._attr_of(node)

    def _set_dir_attr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: Any
                      ) -> pyfuse3.EntryAttributes:
        """``rsync -a SRC/ STORE/`` sets the directory's times and mode: accept and remember them
        for this mount (a store directory has nothing in the backend to keep them in)."""
        if self._read_only(self.stores[self.inodes.ino_store[inode]]):
            raise pyfuse3.FUSEError(errno.EROFS)
        over = self._dir_overrides.setdefault(inode, {})
        if fields.update_mtime:
            over["mtime_ns"] = attr.st_mtime_ns
        if fields.update_mode:
            over["mode"] = attr.st_mode & 0o7777
        return self._dir_attr(inode, self.stores[self.inodes.ino_store[inode]])

    async def _set_meta(self, node: Node, store: Store, meta: Mapping[str, str],
                        expect: str | None = None) -> None:
        """Change a published image's metadata; an idle writer then starts from the result
        (S3 changes metadata by a copy: a new version)."""
        assert node.name is not None
        # S3 rewrites metadata by copying the object: as long as a commit may take.
        info = await bridge.call(store, store.set_meta, node.name, meta, expect,
                                 timeout=self._copy_timeout(store, node))
        self.catalogs[store.id].put(info)
        node.extra["info"] = info
        w = node.writer
        if isinstance(w, Writer) and not w.dirty and w.base is not None:
            w.base = info

    def _copy_timeout(self, store: Store, node: Node) -> float:
        """set_meta may copy the whole image (S3): as long as publishing its size may take."""
        info = node.extra.get("info")
        return self.settings.writer.long_timeout(store, info.size if info else 0)

    async def _truncate_published(self, node: Node, store: Store, size: int) -> None:
        """truncate(2) on a path: a new version with the old bytes up to ``size``."""
        async def published() -> ImageInfo:
            if node.name is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return await self.catalogs[store.id].stat(node.name)

        info = await self._between_releases(node, published)
        if isinstance(node.writer, Writer):  # opened for writing meanwhile: its truncate
            self._refuse_shrink_under_readers(node, size, "truncate")
            await node.writer.truncate(size)
            return
        if info.size == size:
            return
        # Checked again with no await before the writer takes the node, so a reader that
        # opens while the new version is made sees the writer (and reads uncapped).
        self._refuse_shrink_under_readers(node, size, "truncate")
        w = node.writer = self._new_writer(store, node.name, info, info.mode)
        w.private = True
        try:
            await w.truncate(size)
            w.mtime = time.time()
            new = await w.publish()
        finally:
            if node.writer is w:
                node.writer = None
            await w.discard()
        if new is not None:
            self._published(node, new)

    # ------------------------------------------------------------------ directories
    @fuse_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode == ROOT:
            entries = [(sid.encode(), self._dir_attr(self.inodes.store_ino[sid], self.stores[sid]))
                       for sid in self.order]
            if self.default_id:
                entries.append((b"default", self._link_attr()))
        else:
            store = self._store_of_dir(inode)
            infos = await self.catalogs[store.id].list()
            entries = []
            for info in sorted(infos, key=lambda i: i.name):
                node = self.inodes.get(store.id, info.name)
                node.extra["info"] = info
                entries.append((info.name.encode("utf-8", "surrogateescape"),
                                self._image_attr(node, info)))
        fh = self._next_fh
        self._next_fh += 1
        self._dir_listings[fh] = entries
        return fh

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        entries = self._dir_listings.get(fh, [])
        for i in range(start_id, len(entries)):
            name, attr = entries[i]
            if not pyfuse3.readdir_reply(token, name, attr, i + 1):
                return
            node = self.inodes.node(attr.st_ino)
            if node is not None:
                self.inodes.looked_up(node)

    async def releasedir(self, fh: int) -> None:
        self._dir_listings.pop(fh, None)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        # Stores come from the configuration and are flat.
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EPERM)

    # ------------------------------------------------------------------ open/create
    def _new_writer(self, store: Store, name: str, base: ImageInfo | None, mode: int,
                    existed: bool = False) -> Writer:
        assert self.nursery is not None
        return Writer(store, name, base, mode, self.settings.writer, self.nursery, existed)

    def _add_handle(self, h: Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = h
        h.node.opens += 1
        if h.reader is not None:
            h.node.readers.append(h)
        return fh

    def _image_store(self, parent_inode: int, name: bytes) -> tuple[Store, str]:
        store = self._store_of_dir(parent_inode)
        text = _decode(name)
        try:
            check_name(text)
        except InvalidName:
            code = errno.ENAMETOOLONG if len(name) > 255 else errno.EINVAL
            raise pyfuse3.FUSEError(code) from None
        return store, text

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        node = self.inodes.node(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.EISDIR if inode in self.inodes.ino_store
                                    else errno.ENOENT)
        store = self.stores[node.store_id]
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        if not writing and flags & os.O_TRUNC:
            # O_RDONLY|O_TRUNC truncates on Linux, and the kernel leaves it to us (it sends
            # O_TRUNC with the open): without this a read-only store "allowed" it.
            if self._read_only(store):
                raise pyfuse3.FUSEError(errno.EROFS)
            await self._truncate_published(node, store, 0)  # ETXTBSY under readers, as there
        if not writing:
            # Readers see the published version, even while someone writes a new one.
            if node.name is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            info = await self.catalogs[store.id].stat(node.name, fresh=True)
            assert self.source is not None
            reader = Reader(self.source, store, info, self.settings.readahead)
            if (not self.settings.page_cache or isinstance(node.writer, Writer)
                    or node.reported_version != info.version
                    or any(o.cached and o.reader.info.version != info.version
                           for o in node.readers)):
                # The kernel caps page-cache reads at the inode's size, which may not be this
                # version's: it last heard of another version (replaced elsewhere within the
                # attribute TTL), a writer moves it (O_TRUNC sets 0, writes extend it), or a
                # reader of an older, smaller version hit its end (the kernel then lowers the
                # size for everyone). Direct reads are not capped: this reader gets its whole
                # version.
                h = Handle(node, store, reader=reader)
                return pyfuse3.FileInfo(fh=self._add_handle(h), direct_io=True)
            keep = node.cached_version == info.version
            node.cached_version = info.version
            h = Handle(node, store, reader=reader, cached=True)
            return pyfuse3.FileInfo(fh=self._add_handle(h), keep_cache=keep)
        if self._read_only(store):
            raise pyfuse3.FUSEError(errno.EROFS)
        pid = await caller_process(ctx)

        async def published() -> ImageInfo | None:
            """What a new writer would start from; None when there is one to join."""
            if node.name is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            if self._joinable_writer(node) is not None:
                return None
            return await self.catalogs[store.id].stat(node.name)

        info = await self._between_releases(node, published)
        w = self._joinable_writer(node)
        # No await from here until the handle is added: a release starting meanwhile would
        # not count this handle, and a reader opening meanwhile must see the writer (and read
        # uncapped, see open for reading).
        if flags & os.O_TRUNC:
            self._refuse_shrink_under_readers(node, 0, "open with O_TRUNC")
        joined = w is not None
        if w is None:
            assert info is not None and node.name is not None
            truncate = bool(flags & os.O_TRUNC)
            w = self._new_writer(store, node.name, None if truncate else info, info.mode,
                                 existed=True)
            node.writer = w
        node.cached_version = None
        fh = self._add_handle(Handle(node, store, writer=w, pid=pid))
        if joined and flags & os.O_TRUNC:
            await self._truncate_or_release(fh, w)
        return self._write_info(fh)

    async def _truncate_or_release(self, fh: int, w: Writer) -> None:
        """O_TRUNC on a writer other handles share; if it fails, the open fails and its
        handle, which the kernel will never release, is released here."""
        try:
            await w.truncate(0)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.release(fh)
            raise

    @staticmethod
    def _write_info(fh: int) -> pyfuse3.FileInfo:
        """Write handles bypass the page cache: it is per inode, and readers of the same inode
        must keep seeing the published bytes, not the pending ones."""
        return pyfuse3.FileInfo(fh=fh, keep_cache=False, direct_io=True)

    @fuse_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        store, text = self._image_store(parent_inode, name)
        if self._read_only(store):
            raise pyfuse3.FUSEError(errno.EROFS)
        node = self.inodes.get(store.id, text)
        pid = await caller_process(ctx)

        async def refuse_existing() -> None:
            """O_EXCL: EEXIST for a published image (a pending one is checked below)."""
            if self._joinable_writer(node) is None and flags & os.O_EXCL:
                try:
                    await bridge.call(store, store.stat, text)
                    raise pyfuse3.FUSEError(errno.EEXIST)
                except NotFound:
                    pass

        await self._between_releases(node, refuse_existing)
        existing = self._joinable_writer(node)
        # No await until the handle is added (see open).
        if existing is not None:
            if flags & os.O_EXCL:
                raise pyfuse3.FUSEError(errno.EEXIST)
            w = existing
            if flags & os.O_TRUNC:
                self._refuse_shrink_under_readers(node, 0, "create with O_TRUNC")
        else:
            w = self._new_writer(store, text, None, stat.S_IFREG | (mode & 0o7777))
            node.writer = w
        self.inodes.looked_up(node)
        fh = self._add_handle(Handle(node, store, writer=w, pid=pid))
        node.cached_version = None
        if existing is not None and flags & os.O_TRUNC:
            try:
                await self._truncate_or_release(fh, w)
            except BaseException:
                self.inodes.forget(node.ino, 1)
                raise
        return self._write_info(fh), self._writer_attr(node, w)

    # ------------------------------------------------------------------ data
    def _handle(self, fh: int) -> Handle:
        h = self._handles.get(fh)
        if h is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return h

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self._handle(fh)
        try:
            if h.reader is not None:
                return stats.read(h.store.id, await h.reader.read(off, size))
            assert h.writer is not None
            return await h.writer.read(off, size)
        except (Changed, NotFound) as e:
            if h.reader is not None and h.node.name is not None:
                self.catalogs[h.store.id].forget(h.node.name)  # the next stat asks again
            # The version this descriptor reads was replaced or deleted: EIO. read(2) has no
            # ENOENT; tools report it as "No such file or directory" for a file they hold.
            raise Changed(f"{h.store.id}: {e}") from None

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self._handle(fh)
        if h.writer is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        try:
            return stats.written(h.store.id, await h.writer.write(off, buf))
        except NotFound as e:  # the image it started from was deleted: see read
            raise Changed(f"{h.store.id}: {e}") from None

    def _published(self, node: Node, info: ImageInfo) -> None:
        self.catalogs[node.store_id].put(info)
        node.extra["info"] = info
        node.cached_version = None
        log.info("published %s/%s (%d bytes)", node.store_id, info.name, info.size)
        if META_VALUE not in info.meta and self.background_hash is not None:
            self.background_hash.submit(self.stores[node.store_id], info)

    async def _publish(self, h: Handle) -> None:
        w = h.writer
        if w is None:
            return
        if h.node.name is None:
            # Unlinked while open: the bytes have no name. Publishing under the old name, even
            # for a moment, would replace whatever was created under it since.
            if w.dirty:
                log.info("%s/%s: written after unlink; discarded", h.store.id, w.name)
                await w.cancel()
            return
        try:
            info = await w.publish()
        except Exception as e:
            log.error("%s/%s: upload failed, image not published: %s", h.store.id, w.name, e)
            raise
        if info is not None:
            self._published(h.node, info)

    @fuse_errors
    async def flush(self, fh: int) -> None:
        h = self._handle(fh)
        if h.writer is None or not h.writer.dirty:
            return
        if await self._writer_killed(h):
            return
        if h.pid and h.node.name is not None and self.settings.mountpoint:
            path = os.path.join(self.settings.mountpoint, h.store.id, h.node.name)
            if await bridge.local(still_open_by, h.pid, path, h.node.ino):
                log.debug("%s: flush from another descriptor copy; not publishing yet", path)
                return
        await self._publish(h)

    async def _writer_killed(self, h: Handle) -> bool:
        """The writing process is dying from a signal: drop its pending bytes, publish nothing."""
        w = h.writer
        if w is None or not w.dirty or not h.pid:
            return False
        sig = await bridge.local(killed_by, h.pid)
        if not sig:
            return False
        log.warning("%s/%s: the writer (pid %d) was killed by signal %d; its pending bytes are "
                    "discarded, nothing is published", h.store.id, w.name, h.pid, sig)
        await w.cancel()
        return True

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        h = self._handle(fh)
        if h.writer is not None:
            await h.writer.sync()

    async def release(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is None:
            return
        node = h.node
        if h.reader is not None:
            node.readers.remove(h)
        w = h.writer
        still_open = any(o.writer is w for o in self._handles.values()) if w else False
        if w is not None and not still_open:
            w.closing = True  # before any await: from now on nobody joins w
            try:
                await self._release_writer(h, w)
            finally:
                if node.writer is w:
                    node.writer = None
                w.closed.set()
        self.inodes.closed(node)

    async def _release_writer(self, h: Handle, w: Writer) -> None:
        """The last close of ``w``: publish what it holds (unless its process was killed or
        an earlier publish failed), then drop its spool or upload."""
        node = h.node
        await self._writer_killed(h)
        if w.dirty and node.name is not None and w.publish_error is None:
            try:
                await self._publish(h)
            except Exception:
                log.error("%s/%s: last close could not publish; the new bytes are discarded",
                          h.store.id, w.name)
        elif w.dirty and node.name is not None:
            log.error("%s/%s: publish failed at flush (%s); the new bytes are discarded",
                      h.store.id, w.name, w.publish_error)
        await w.discard()

    # ------------------------------------------------------------------ namespace changes
    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        store, text = self._image_store(parent_inode, name)
        if self._read_only(store):
            raise pyfuse3.FUSEError(errno.EROFS)
        node = self.inodes.find(store.id, text)
        if node is None or not self._pending(node):
            await bridge.call(store, store.delete, text)
        self.catalogs[store.id].forget(text)
        if node is not None:
            self.inodes.unlink(node)

    @fuse_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        store, old = self._image_store(parent_inode_old, name_old)
        new_store, new = self._image_store(parent_inode_new, name_new)
        if new_store is not store:
            raise pyfuse3.FUSEError(errno.EXDEV)
        if self._read_only(store):
            raise pyfuse3.FUSEError(errno.EROFS)
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        if old == new:
            return
        if flags & pyfuse3.RENAME_NOREPLACE:
            try:
                await self.catalogs[store.id].stat(new)
                raise pyfuse3.FUSEError(errno.EEXIST)
            except NotFound:
                pass
        node = self.inodes.find(store.id, old)
        w = await self._settled_writer(node) if node is not None else None
        if w is not None and w.dirty:
            writers = self._writer_pids(w)
            if await caller_process(ctx) not in writers:
                # Only the writer knows when its bytes are complete (write, fsync, rename,
                # close); anyone else would publish a half-written image under the new name.
                log.warning("%s/%s: rename refused (EBUSY): still being written by pid %s",
                            store.id, old, ", ".join(map(str, sorted(writers))) or "?")
                raise pyfuse3.FUSEError(errno.EBUSY)
            await self._publish(Handle(node, store, writer=w))  # type: ignore[arg-type]
        size = (await self.catalogs[store.id].stat(old)).size
        info = await bridge.call(store, store.rename, old, new,
                                 timeout=self.settings.writer.long_timeout(store, size))
        cat = self.catalogs[store.id]
        cat.forget(old)
        cat.put(info)
        if node is None:
            node = self.inodes.get(store.id, old)
        self.inodes.rename(node, new)
        node.extra["info"] = info
        node.cached_version = None
        if w is not None:
            w.name = new
            w.base = info

    # ------------------------------------------------------------------ xattrs & statfs
    def _xattrs_of_store(self, store: Store) -> dict[str, str]:
        return {
            "user.imagefs.type": store.type_name,
            "user.imagefs.description": store.description,
            "user.imagefs.default": "true" if store.default else "false",
            "user.imagefs.read_only": "true" if self._read_only(store) else "false",
            "user.imagefs.weight": str(store.weight),
            "user.imagefs.hash_algo": self.settings.writer.hash_algo,
        }

    async def _xattrs(self, inode: int, location: bool = True) -> Mapping[str, str]:
        """The attributes of a store directory or image; ``location=False`` skips the one that
        may cost a backend call (rbd), for a getxattr of another name (ls asks for ACLs)."""
        if inode in self.inodes.ino_store:
            return self._xattrs_of_store(self.stores[self.inodes.ino_store[inode]])
        node = self.inodes.node(inode)
        if node is None or node.name is None:
            return {}
        store = self.stores[node.store_id]
        info = await self.catalogs[store.id].stat(node.name)
        out = {"user.imagefs.store": store.id, "user.imagefs.version": info.version}
        try:  # off the trio thread: rbd may have to look at the image's snapshots
            if location:
                out[_LOCATION] = await bridge.call(store, store.location, node.name)
        except StoreError as e:  # Glance has no form for it: no location, never a wrong one
            log.debug("%s/%s: no location: %s", store.id, node.name, e)
        for key in _SETTABLE_META:
            if key in info.meta:
                out[f"user.imagefs.{key}"] = info.meta[key]
        return out

    async def _glance_location(self, inode: int, ctx: Any) -> str | None:
        """``GLANCE_XATTR``: the location glance_store can use, secrets and all (S3), for
        callers with CAP_SYS_ADMIN only. The kernel already refuses ``trusted.*`` to anyone
        else before asking us; checking the caller's capabilities here too keeps the secret
        in the daemon if the mount is ever reached some other way (a user namespace)."""
        node = self.inodes.node(inode)
        if inode in self.inodes.ino_store or node is None or node.name is None:
            return None
        if not await bridge.local(has_sys_admin, ctx.pid):
            log.warning("%s: refused to process %d (no CAP_SYS_ADMIN)", GLANCE_XATTR, ctx.pid)
            return None
        store = self.stores[node.store_id]
        await self.catalogs[store.id].stat(node.name)  # ENOENT for a name that is gone
        try:
            return await bridge.call(store, store.glance_location, node.name)
        except StoreError as e:
            log.info("%s/%s: no Glance location: %s", store.id, node.name, e)
            return None

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        key = _decode(name)
        if key == GLANCE_XATTR:
            value = await self._glance_location(inode, ctx)
        else:
            value = (await self._xattrs(inode, location=key == _LOCATION)).get(key)
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value.encode()

    @fuse_errors
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        """``GLANCE_XATTR`` is listed only to callers who may read it (as ext4 lists
        ``trusted.*`` only to CAP_SYS_ADMIN), and only where the image has a location."""
        names = [k.encode() for k in await self._xattrs(inode)]
        if _LOCATION.encode() in names and await bridge.local(has_sys_admin, ctx.pid):
            names.append(GLANCE_XATTR.encode())
        return names

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        """Only the hash attributes are settable: one at a time, or all three at once as
        ``user.imagefs.hashes`` (what ``imagefs hash`` sets), refused with ESTALE when the
        image is no longer the version they were computed from. ``user.imagefs.discard`` on a
        file open for writing drops its pending bytes, so a writer that failed half-way
        (``imagefs copy``) can close without publishing."""
        key = _decode(name).removeprefix("user.imagefs.")
        node = self.inodes.node(inode)
        if key == "discard" and node is not None:
            w = node.writer if isinstance(node.writer, Writer) else None
            if w is None:
                raise pyfuse3.FUSEError(errno.EINVAL)  # nothing pending to discard
            log.info("%s/%s: pending bytes discarded on request", w.store.id, w.name)
            await w.cancel()
            return
        if (key not in _SETTABLE_META and key != "hashes") or node is None or node.name is None:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        store = self.stores[node.store_id]
        if self._read_only(store):
            raise pyfuse3.FUSEError(errno.EROFS)
        meta, version = {key: _decode(value)}, None
        if key == "hashes":
            try:
                version, meta = parse_hashes(_decode(value))
            except ValueError as e:
                log.warning("%s/%s: user.imagefs.hashes refused: %s", store.id, node.name, e)
                raise pyfuse3.FUSEError(errno.EINVAL) from None
        try:
            await self._set_meta(node, store, meta, version)
        except Changed as e:
            self.catalogs[store.id].forget(node.name)
            log.warning("%s/%s: hashes not stored: they were computed from version %s (%s)",
                        store.id, node.name, version, e)
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        raise pyfuse3.FUSEError(errno.EOPNOTSUPP)

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 1 << 20
        s.f_blocks = s.f_bfree = s.f_bavail = 1 << 30  # 1 PiB: backends report no capacity
        s.f_files = s.f_ffree = s.f_favail = 1 << 30
        s.f_namemax = 255
        return s

    # ------------------------------------------------------------------ shutdown
    async def drain(self) -> None:
        """Discard every unpublished writer (unmount): nothing partial may become visible."""
        writers = {id(h.writer): h.writer for h in self._handles.values() if h.writer}
        for w in writers.values():
            if w.dirty:
                log.warning("%s/%s: unmounted while still open for writing; not published",
                            w.store.id, w.name)
            await w.discard()
        self._handles.clear()
