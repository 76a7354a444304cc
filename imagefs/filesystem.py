"""The file system's semantics: root = one directory per store, images = files.

This layer takes and returns plain values (``Attr``, ``Opened``, names as ``str``) and
raises store errors, ``OSError`` or ``FsError``; it knows no FUSE library: imagefs.fs is the
glue that decodes requests, builds the kernel's replies and maps errors. Stores are reached
only through the ``Store`` interface (via ``bridge``), readers and writers. What imagefs
guarantees is written down in doc/SEMANTICS.md; the rules that make those guarantees are here
and in the modules this one delegates to:

* imagefs.attributes: what stat shows;
* imagefs.handles: the handle table and the rules for sharing a node's writer;
* imagefs.publish: when pending bytes become the image (flush, release, unmount);
* imagefs.opening: open, create and truncate, which start or join writers;
* imagefs.xattrs: extended attributes and the Glance location.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import trio

from imagefs import bridge, stats
from imagefs.attributes import Attr, AttrChange, Attributes
from imagefs.background_hash import BackgroundHasher
from imagefs.catalog import Catalog
from imagefs.errors import FsError
from imagefs.handles import (
    Activity,
    Handle,
    Handles,
    caller_process,
    pending,
    refuse_shrink_under_readers,
    settled_writer,
)
from imagefs.inodes import ROOT, InodeTable, Node
from imagefs.opening import Opened, Opener
from imagefs.publish import Publisher
from imagefs.reader import BlockSource
from imagefs.stores.base import (
    META_GID,
    META_MODE,
    META_MTIME,
    META_UID,
    Changed,
    ImageInfo,
    InvalidName,
    NotFound,
    Store,
    check_name,
)
from imagefs.writer import WriterSettings
from imagefs.xattrs import Xattrs

log = logging.getLogger(__name__)

__all__ = ["Attr", "AttrChange", "FileSystem", "FsSettings", "Opened"]


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
    page_cache: bool = False

    def read_only_for(self, store: Store) -> bool:
        return store.read_only or self.read_only


class FileSystem:
    """The operations over a set of opened stores; ``bind`` before the first one."""

    def __init__(self, stores: list[Store], source_factory: Callable[[trio.Nursery], BlockSource],
                 settings: FsSettings) -> None:
        self.stores = {s.id: s for s in stores}
        self.order = [s.id for s in stores]
        self.settings = settings
        self.inodes = InodeTable(self.order)
        self.catalogs = {s.id: Catalog(s, settings.ttl) for s in stores}
        self.default_id = next((s.id for s in stores if s.default), None)
        self._source_factory = source_factory
        self.source: BlockSource | None = None
        self.nursery: trio.Nursery | None = None
        self.handles = Handles()
        self.attrs = Attributes(settings, self.inodes, self.stores, self.default_id)
        self.publisher = Publisher(self.stores, self.catalogs, self.inodes, self.handles,
                                   settings.writer, settings.mountpoint)
        self.opener = Opener(self)
        self.xattrs = Xattrs(self)
        self._dir_listings: dict[int, list[tuple[str, Attr]]] = {}

    def bind(self, nursery: trio.Nursery) -> None:
        """Attach the nursery that background work (prefetch, streaming uploads) runs in."""
        self.nursery = nursery
        self.source = self._source_factory(nursery)
        ws = self.settings.writer
        hasher = BackgroundHasher(ws.hash_algo, ws.hash_background_max, ws.long_timeout,
                                  self._hashed, self._changing)
        self.publisher.background_hash = hasher
        nursery.start_soon(hasher.run)

    def _changing(self, store_id: str, name: str) -> bool:
        """A writer holds changes to this image that are not published yet."""
        node = self.inodes.find(store_id, name)
        return node is not None and node.writer is not None and node.writer.dirty

    def _hashed(self, store: Store, info: ImageInfo) -> None:
        """The background hasher stored an image's hashes: show them."""
        self.catalogs[store.id].put(info)
        node = self.inodes.find(store.id, info.name)
        if node is not None:
            node.info = info

    def activity(self) -> Activity:
        """What is open right now, for imagefs.status (safe from any thread)."""
        return self.handles.activity()

    # ------------------------------------------------------------------ names
    def store_of_dir(self, ino: int) -> Store:
        sid = self.inodes.ino_store.get(ino)
        if sid is None:
            known = self.inodes.node(ino) is not None or ino == self.inodes.default_link
            raise FsError(errno.ENOTDIR if known else errno.ENOENT)
        return self.stores[sid]

    def image_store(self, parent: int, name: str) -> tuple[Store, str]:
        """The store of directory ``parent``, and ``name`` checked as an image name."""
        store = self.store_of_dir(parent)
        try:
            check_name(name)
        except InvalidName:
            too_long = len(name.encode("utf-8", "surrogateescape")) > 255
            raise FsError(errno.ENAMETOOLONG if too_long else errno.EINVAL) from None
        return store, name

    def writable(self, store: Store) -> None:
        if self.settings.read_only_for(store):
            raise FsError(errno.EROFS)

    # ------------------------------------------------------------------ attributes
    async def attr_of(self, node: Node) -> Attr:
        w = node.writer
        if w is not None and node.name is not None and w.name_shows_image \
                and (w.doomed or node.readers):
            # A published image is behind the name while new bytes are pending, and someone
            # reads it: readers take the size from stat (qemu) and the kernel ends their reads
            # there, so it never drops below the published size; a growing writer's shows.
            try:
                info = await self.catalogs[node.store_id].stat(node.name)
            except NotFound:
                info = None
            if info is not None:
                node.info = info
                a = self.attrs.image(node, info)
                if w.dirty and not w.doomed and w.size > info.size:
                    a = replace(a, size=w.size)
                return replace(a, ttl=0)
        if w is not None and w.shows_own_attributes:
            return self.attrs.of_writer(node, w)
        if node.name is None:
            if node.info is None:
                raise FsError(errno.ENOENT)
            return self.attrs.image(node, node.info)
        info = await self.catalogs[node.store_id].stat(node.name)
        node.info = info
        return self.attrs.image(node, info)

    async def lookup(self, parent: int, name: str, pid: int | None = None) -> Attr:
        """``pid``: the requesting thread, None when the kernel did not say."""
        if parent == ROOT:
            if name in self.inodes.store_ino:
                return self.attrs.directory(self.inodes.store_ino[name], self.stores[name])
            if name == "default" and self.default_id:
                return self.attrs.link()
            raise FsError(errno.ENOENT)
        store = self.store_of_dir(parent)
        try:
            check_name(name)
        except InvalidName:
            raise FsError(errno.ENOENT) from None
        node = self.inodes.find(store.id, name)
        if node is not None and node.writer is not None and pending(node):
            # Still being written and never published: nobody may see it under its name yet,
            # except the writing process itself (stat, rename or unlink of its own new file).
            w = node.writer
            if pid is not None and await caller_process(pid) in self.handles.writer_pids(w):
                self.inodes.looked_up(node)
                return self.attrs.of_writer(node, w)
            raise FsError(errno.ENOENT)
        info = await self.catalogs[store.id].stat(name)
        node = self.inodes.get(store.id, name)
        node.info = info
        attr = await self.attr_of(node) if node.writer is not None else \
            self.attrs.image(node, info)
        self.inodes.looked_up(node)
        return attr

    def forget(self, inodes: list[tuple[int, int]]) -> None:
        for ino, count in inodes:
            self.inodes.forget(ino, count)

    async def getattr(self, inode: int) -> Attr:
        if inode == ROOT:
            return self.attrs.directory(ROOT, None)
        if inode in self.inodes.ino_store:
            return self.attrs.directory(inode, self.stores[self.inodes.ino_store[inode]])
        if inode == self.inodes.default_link and self.default_id:
            return self.attrs.link()
        node = self.inodes.node(inode)
        if node is None:
            raise FsError(errno.ENOENT)
        return await self.attr_of(node)

    def readlink(self, inode: int) -> str:
        if inode == self.inodes.default_link and self.default_id:
            return self.default_id
        raise FsError(errno.EINVAL)

    async def setattr(self, inode: int, change: AttrChange, fh: int | None = None) -> Attr:
        node = self.inodes.node(inode)
        if node is None:
            if inode in self.inodes.ino_store and change.size is None \
                    and change.uid is None and change.gid is None:
                store = self.stores[self.inodes.ino_store[inode]]
                self.writable(store)
                self.attrs.set_directory(inode, change)
                return self.attrs.directory(inode, store)
            raise FsError(errno.EPERM if inode == ROOT or inode in self.inodes.ino_store
                          else errno.ENOENT)
        store = self.stores[node.store_id]
        if change != AttrChange():
            # Before the chown policy: a read-only store refuses every change with EROFS, as
            # a read-only file system does (not EPERM for a chown that "refuse" would refuse).
            self.writable(store)
        owner = self._owner_change(node, store, change)
        own = self.handles.own(fh)
        w = own.writer if own is not None and own.writer is not None else \
            await settled_writer(node)
        if change.size is not None:
            refuse_shrink_under_readers(node, change.size, "truncate")
            if w is None:
                await self.opener.truncate_published(node, store, change.size)
            else:
                try:
                    await w.truncate(change.size)
                except NotFound as e:
                    if own is None:
                        raise
                    raise Changed(f"{store.id}: {e}") from None  # ftruncate(2): see read
        meta: dict[str, str] = {}
        if change.mode is not None:
            meta[META_MODE] = f"{change.mode & 0o7777:o}"
        if change.mtime_ns is not None:
            meta[META_MTIME] = repr(change.mtime_ns / 1e9)
        meta.update(owner)
        if meta:
            if w is not None and w.holds_attributes:
                if change.mode is not None:
                    w.mode = change.mode
                if change.mtime_ns is not None:
                    w.mtime = change.mtime_ns / 1e9
                w.owner.update(owner)
            elif node.name is not None:
                await self.publisher.set_meta(node, store, meta)
        return await self.attr_of(node)

    def _owner_change(self, node: Node, store: Store, change: AttrChange) -> dict[str, str]:
        """chown/chgrp: the metadata to keep, as the store's ``chown`` setting says."""
        shown = self.attrs.image(node, node.info) if node.info else None
        uid = shown.uid if shown else self.settings.uid
        gid = shown.gid if shown else self.settings.gid
        owner = {}
        if change.uid is not None and change.uid != uid:
            owner[META_UID] = str(change.uid)
        if change.gid is not None and change.gid != gid:
            owner[META_GID] = str(change.gid)
        if not owner or store.chown == "keep":
            return owner
        if store.chown == "ignore":
            return {}
        log.debug("%s/%s: chown refused (store setting chown = \"refuse\")", store.id,
                  node.name)
        raise FsError(errno.EPERM)

    # ------------------------------------------------------------------ directories
    async def opendir(self, inode: int) -> int:
        """A directory handle whose listing is taken now (``listing`` pages through it)."""
        if inode == ROOT:
            entries = [(sid, self.attrs.directory(self.inodes.store_ino[sid], self.stores[sid]))
                       for sid in self.order]
            if self.default_id:
                entries.append(("default", self.attrs.link()))
        else:
            store = self.store_of_dir(inode)
            entries = []
            for info in sorted(await self.catalogs[store.id].list(), key=lambda i: i.name):
                node = self.inodes.get(store.id, info.name)
                node.info = info
                entries.append((info.name, self.attrs.image(node, info)))
        fh = self.handles.new_fh()
        self._dir_listings[fh] = entries
        return fh

    def listing(self, fh: int) -> list[tuple[str, Attr]]:
        return self._dir_listings.get(fh, [])

    def listed(self, attr: Attr) -> None:
        """An entry of a listing reached the kernel: it holds a reference now."""
        node = self.inodes.node(attr.ino)
        if node is not None:
            self.inodes.looked_up(node)

    def releasedir(self, fh: int) -> None:
        self._dir_listings.pop(fh, None)

    # ------------------------------------------------------------------ open & data
    async def open(self, inode: int, flags: int, pid: int) -> Opened:
        return await self.opener.open(inode, flags, pid)

    async def create(self, parent: int, name: str, mode: int, flags: int, pid: int
                     ) -> tuple[Opened, Attr]:
        return await self.opener.create(parent, name, mode, flags, pid)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self.handles.get(fh)
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

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self.handles.get(fh)
        if h.writer is None:
            raise FsError(errno.EBADF)
        try:
            return stats.written(h.store.id, await h.writer.write(off, buf))
        except NotFound as e:  # the image it started from was deleted: see read
            raise Changed(f"{h.store.id}: {e}") from None

    async def flush(self, fh: int) -> None:
        await self.publisher.flush(self.handles.get(fh))

    async def fsync(self, fh: int) -> None:
        h = self.handles.get(fh)
        if h.writer is not None:
            await h.writer.sync()

    async def release(self, fh: int) -> None:
        await self.publisher.release(fh)

    async def drain(self) -> None:
        """Unmount: every unpublished writer is discarded."""
        await self.publisher.drain()

    # ------------------------------------------------------------------ namespace changes
    async def unlink(self, parent: int, name: str) -> None:
        store, name = self.image_store(parent, name)
        self.writable(store)
        node = self.inodes.find(store.id, name)
        if node is None or not pending(node):
            await bridge.call(store, store.delete, name)
        self.catalogs[store.id].forget(name)
        if node is not None:
            self.inodes.unlink(node)

    async def rename(self, parent_old: int, old: str, parent_new: int, new: str, pid: int,
                     noreplace: bool = False, exchange: bool = False) -> None:
        store, old = self.image_store(parent_old, old)
        new_store, new = self.image_store(parent_new, new)
        if new_store is not store:
            raise FsError(errno.EXDEV)
        self.writable(store)
        if exchange:
            raise FsError(errno.EINVAL)
        if old == new:
            return
        cat = self.catalogs[store.id]
        if noreplace:
            try:
                await cat.stat(new)
                raise FsError(errno.EEXIST)
            except NotFound:
                pass
        node = self.inodes.find(store.id, old)
        w = await settled_writer(node) if node is not None else None
        if node is not None and w is not None and w.dirty:
            writers = self.handles.writer_pids(w)
            if await caller_process(pid) not in writers:
                # Only the writer knows when its bytes are complete (write, fsync, rename,
                # close); anyone else would publish a half-written image under the new name.
                log.warning("%s/%s: rename refused (EBUSY): still being written by pid %s",
                            store.id, old, ", ".join(map(str, sorted(writers))) or "?")
                raise FsError(errno.EBUSY)
            await self.publisher.publish(Handle(node, store, writer=w))
        size = (await cat.stat(old)).size
        info = await bridge.call(store, store.rename, old, new,
                                 timeout=self.settings.writer.long_timeout(store, size))
        cat.forget(old)
        cat.put(info)
        if node is None:
            node = self.inodes.get(store.id, old)
        self.inodes.rename(node, new)
        node.info = info
        node.cached_version = None
        if w is not None:
            w.name = new
            w.base = info

    # ------------------------------------------------------------------ extended attributes
    async def getxattr(self, inode: int, name: str, pid: int) -> str:
        return await self.xattrs.get(inode, name, pid)

    async def listxattr(self, inode: int, pid: int) -> list[str]:
        return await self.xattrs.names(inode, pid)

    async def setxattr(self, inode: int, name: str, value: str) -> None:
        await self.xattrs.set(inode, name, value)
