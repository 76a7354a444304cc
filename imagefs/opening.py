"""open, create and truncate: who reads which version, and who starts or joins a writer.

Readers see the published version they opened, even while someone writes a new one; whether
the kernel may serve them from its page cache depends on what it last heard of the image's size.
Writers share one pending version per image (imagefs.handles), start it from the published
bytes unless O_TRUNC says otherwise, and never shrink an image below what page-cache readers
hold (ETXTBSY).
"""

from __future__ import annotations

import errno
import os
import stat
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from imagefs import bridge
from imagefs.attributes import Attr
from imagefs.errors import FsError
from imagefs.handles import (
    Handle,
    between_releases,
    caller_process,
    joinable_writer,
    refuse_shrink_under_readers,
)
from imagefs.inodes import Node
from imagefs.reader import Reader
from imagefs.stores.base import Capability, ImageInfo, NotFound, Store
from imagefs.writer import Writer
from imagefs.writer_direct import DirectWriter
from imagefs.writer_spool import SpoolWriter

if TYPE_CHECKING:
    from imagefs.filesystem import FileSystem


@dataclass(frozen=True)
class Opened:
    """An open handle and how the kernel is to treat its pages (FOPEN_DIRECT_IO,
    FOPEN_KEEP_CACHE)."""

    fh: int
    direct_io: bool = False
    keep_cache: bool = True


def _for_writing(fh: int) -> Opened:
    """Write handles bypass the page cache: it is per inode, and readers of the same inode
    must keep seeing the published bytes, not the pending ones."""
    return Opened(fh, direct_io=True, keep_cache=False)


class Opener:
    def __init__(self, fs: FileSystem) -> None:
        self.fs = fs

    def new_writer(self, store: Store, name: str, base: ImageInfo | None, mode: int,
                   existed: bool = False) -> Writer:
        """The write strategy is the store's: in place where it takes random writes, else
        through a local spool."""
        assert self.fs.nursery is not None
        cls = DirectWriter if Capability.RANDOM_WRITE in store.capabilities else SpoolWriter
        return cls(store, name, base, mode, self.fs.settings.writer, self.fs.nursery, existed)

    async def open(self, inode: int, flags: int, pid: int) -> Opened:
        """``pid``: the requesting thread."""
        fs = self.fs
        node = fs.inodes.node(inode)
        if node is None:
            raise FsError(errno.EISDIR if inode in fs.inodes.ino_store else errno.ENOENT)
        store = fs.stores[node.store_id]
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        if not writing and flags & os.O_TRUNC:
            # O_RDONLY|O_TRUNC truncates on Linux, and the kernel leaves it to us (it sends
            # O_TRUNC with the open): without this a read-only store "allowed" it.
            fs.writable(store)
            await self.truncate_published(node, store, 0)  # ETXTBSY under readers, as there
        if not writing:
            return await self._open_for_reading(node, store)
        fs.writable(store)
        process = await caller_process(pid)

        async def published() -> ImageInfo | None:
            """What a new writer would start from; None when there is one to join."""
            if node.name is None:
                raise FsError(errno.ENOENT)
            if joinable_writer(node) is not None:
                return None
            return await fs.catalogs[store.id].stat(node.name)

        info = await between_releases(node, published)
        w = joinable_writer(node)
        # No await from here until the handle is added: a release starting meanwhile would
        # not count this handle, and a reader opening meanwhile must see the writer (and read
        # uncapped, see open for reading).
        if flags & os.O_TRUNC:
            refuse_shrink_under_readers(node, 0, "open with O_TRUNC")
        joined = w is not None
        if w is None:
            assert info is not None and node.name is not None
            truncate = bool(flags & os.O_TRUNC)
            w = self.new_writer(store, node.name, None if truncate else info, info.mode,
                                existed=True)
            node.writer = w
        node.cached_version = None
        fh = fs.handles.add(Handle(node, store, writer=w, pid=process))
        if joined and flags & os.O_TRUNC:
            await self._truncate_or_release(fh, w)
        return _for_writing(fh)

    async def _open_for_reading(self, node: Node, store: Store) -> Opened:
        """Readers see the published version, even while someone writes a new one."""
        fs = self.fs
        if node.name is None:
            raise FsError(errno.ENOENT)
        info = await fs.catalogs[store.id].stat(node.name, fresh=True)
        assert fs.source is not None
        reader = Reader(fs.source, store, info, fs.settings.readahead)
        if (not fs.settings.page_cache or node.writer is not None
                or node.reported_version != info.version
                or any(o.cached and o.reader is not None and o.reader.info.version != info.version
                       for o in node.readers)):
            # The kernel caps page-cache reads at the inode's size, which may not be this
            # version's: it last heard of another version (replaced elsewhere within the
            # attribute TTL), a writer moves it (O_TRUNC sets 0, writes extend it), or a
            # reader of an older, smaller version hit its end (the kernel then lowers the
            # size for everyone). Direct reads are not capped: this reader gets its whole
            # version.
            return Opened(fs.handles.add(Handle(node, store, reader=reader)), direct_io=True)
        keep = node.cached_version == info.version
        node.cached_version = info.version
        fh = fs.handles.add(Handle(node, store, reader=reader, cached=True))
        return Opened(fh, keep_cache=keep)

    async def _truncate_or_release(self, fh: int, w: Writer) -> None:
        """O_TRUNC on a writer other handles share; if it fails, the open fails and its
        handle, which the kernel will never release, is released here."""
        try:
            await w.truncate(0)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.fs.release(fh)
            raise

    async def create(self, parent: int, name: str, mode: int, flags: int, pid: int
                     ) -> tuple[Opened, Attr]:
        fs = self.fs
        store, name = fs.image_store(parent, name)
        fs.writable(store)
        node = fs.inodes.get(store.id, name)
        process = await caller_process(pid)

        async def refuse_existing() -> None:
            """O_EXCL: EEXIST for a published image (a pending one is checked below)."""
            if joinable_writer(node) is None and flags & os.O_EXCL:
                try:
                    await bridge.call(store, store.stat, name)
                    raise FsError(errno.EEXIST)
                except NotFound:
                    pass

        await between_releases(node, refuse_existing)
        existing = joinable_writer(node)
        # No await until the handle is added (see open).
        if existing is not None:
            if flags & os.O_EXCL:
                raise FsError(errno.EEXIST)
            w = existing
            if flags & os.O_TRUNC:
                refuse_shrink_under_readers(node, 0, "create with O_TRUNC")
        else:
            w = self.new_writer(store, name, None, stat.S_IFREG | (mode & 0o7777))
            node.writer = w
        fs.inodes.looked_up(node)
        fh = fs.handles.add(Handle(node, store, writer=w, pid=process))
        node.cached_version = None
        if existing is not None and flags & os.O_TRUNC:
            try:
                await self._truncate_or_release(fh, w)
            except BaseException:
                fs.inodes.forget(node.ino, 1)
                raise
        return _for_writing(fh), fs.attrs.of_writer(node, w)

    async def truncate_published(self, node: Node, store: Store, size: int) -> None:
        """truncate(2) on a path: a new version with the old bytes up to ``size``."""
        fs = self.fs

        async def published() -> ImageInfo:
            if node.name is None:
                raise FsError(errno.ENOENT)
            return await fs.catalogs[store.id].stat(node.name)

        info = await between_releases(node, published)
        if node.writer is not None:  # opened for writing meanwhile: its truncate
            refuse_shrink_under_readers(node, size, "truncate")
            await node.writer.truncate(size)
            return
        if info.size == size:
            return
        # Checked again with no await before the writer takes the node, so a reader that
        # opens while the new version is made sees the writer (and reads uncapped).
        refuse_shrink_under_readers(node, size, "truncate")
        assert node.name is not None
        w = node.writer = self.new_writer(store, node.name, info, info.mode)
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
            fs.publisher.published(node, new)
