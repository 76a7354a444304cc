"""The FUSE glue: pyfuse3 requests in, the file system's answers out.

Each operation decodes what the kernel sent (names are bytes, attributes and flags are
pyfuse3 objects), calls imagefs.filesystem, which holds every rule, and builds the reply.
Errors become errno values through the one mapping in imagefs.errors, here and nowhere else;
every error that is not the caller's own mistake is logged with the operation it ended.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3
import trio

from imagefs import errors
from imagefs.attributes import BLOCK_SIZE, Attr, AttrChange
from imagefs.errors import FsError, errno_of
from imagefs.filesystem import FileSystem, FsSettings
from imagefs.handles import Activity
from imagefs.inodes import ROOT, InodeTable
from imagefs.opening import Opened
from imagefs.reader import BlockSource
from imagefs.stores.base import Store, StoreError
from imagefs.xattrs import GLANCE_XATTR

#: GLANCE_XATTR is imported from here by imagefs.cli.
__all__ = ["GLANCE_XATTR", "ImageFS"]

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

assert ROOT == pyfuse3.ROOT_INODE


def fuse_errors(fn: F) -> F:
    """Turn store, fs and OS errors into FUSEError, logging the ones an operator must see."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except (pyfuse3.FUSEError, trio.Cancelled):
            raise
        except FsError as e:  # decided, and logged where needed, by the file system
            raise pyfuse3.FUSEError(e.errno) from None
        except Exception as e:
            code = errno_of(e)
            if code in errors.QUIET:
                log.debug("%s: %s (%s)", fn.__name__, errno.errorcode.get(code), e)
            elif isinstance(e, StoreError | OSError):
                log.error("%s failed: %s: %s", fn.__name__,
                          errno.errorcode.get(code, code), e)
            else:
                log.exception("%s failed unexpectedly", fn.__name__)
            raise pyfuse3.FUSEError(code) from None

    return wrapper  # type: ignore[return-value]


def _decode(name: bytes) -> str:
    return name.decode("utf-8", "surrogateescape")


def _encode(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def _entry(a: Attr) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = a.ino
    e.st_mode = a.mode
    e.st_nlink = a.nlink
    e.st_uid = a.uid
    e.st_gid = a.gid
    e.st_size = a.size
    e.st_blocks = a.blocks
    e.st_blksize = BLOCK_SIZE
    e.st_atime_ns = a.atime_ns
    e.st_mtime_ns = e.st_ctime_ns = a.mtime_ns
    e.entry_timeout = e.attr_timeout = a.ttl
    return e


def _file_info(o: Opened) -> pyfuse3.FileInfo:
    return pyfuse3.FileInfo(fh=o.fh, direct_io=o.direct_io, keep_cache=o.keep_cache)


def _change(attr: pyfuse3.EntryAttributes, fields: Any) -> AttrChange:
    return AttrChange(size=attr.st_size if fields.update_size else None,
                      mode=attr.st_mode if fields.update_mode else None,
                      mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
                      uid=attr.st_uid if fields.update_uid else None,
                      gid=attr.st_gid if fields.update_gid else None)


class ImageFS(pyfuse3.Operations):
    """pyfuse3 operations over a ``FileSystem`` (``self.filesystem``)."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, stores: list[Store], source_factory: Callable[[trio.Nursery], BlockSource],
                 settings: FsSettings) -> None:
        super().__init__()
        self.filesystem = FileSystem(stores, source_factory, settings)

    # ------------------------------------------------------------------ for the daemon
    @property
    def stores(self) -> dict[str, Store]:
        return self.filesystem.stores

    @property
    def inodes(self) -> InodeTable:
        return self.filesystem.inodes

    @property
    def source(self) -> BlockSource | None:
        return self.filesystem.source

    def bind(self, nursery: trio.Nursery) -> None:
        self.filesystem.bind(nursery)

    async def drain(self) -> None:
        await self.filesystem.drain()

    def activity(self) -> Activity:
        return self.filesystem.activity()

    # ------------------------------------------------------------------ lookup & attributes
    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None
                     ) -> pyfuse3.EntryAttributes:
        pid = ctx.pid if ctx is not None else None
        return _entry(await self.filesystem.lookup(parent_inode, _decode(name), pid))

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        self.filesystem.forget(inode_list)

    @fuse_errors
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return _entry(await self.filesystem.getattr(inode))

    @fuse_errors
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return _encode(self.filesystem.readlink(inode))

    @fuse_errors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: Any,
                      fh: int | None, ctx: Any) -> pyfuse3.EntryAttributes:
        return _entry(await self.filesystem.setattr(inode, _change(attr, fields), fh))

    # ------------------------------------------------------------------ directories
    @fuse_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        return await self.filesystem.opendir(inode)

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        entries = self.filesystem.listing(fh)
        for i in range(start_id, len(entries)):
            name, attr = entries[i]
            if not pyfuse3.readdir_reply(token, _encode(name), _entry(attr), i + 1):
                return
            self.filesystem.listed(attr)

    async def releasedir(self, fh: int) -> None:
        self.filesystem.releasedir(fh)

    # Stores come from the configuration and are flat; images are files.
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EPERM)

    # ------------------------------------------------------------------ open & data
    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        return _file_info(await self.filesystem.open(inode, flags, ctx.pid))

    @fuse_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        opened, attr = await self.filesystem.create(parent_inode, _decode(name), mode, flags,
                                                    ctx.pid)
        return _file_info(opened), _entry(attr)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.filesystem.read(fh, off, size)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.filesystem.write(fh, off, buf)

    @fuse_errors
    async def flush(self, fh: int) -> None:
        await self.filesystem.flush(fh)

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.filesystem.fsync(fh)

    async def release(self, fh: int) -> None:
        await self.filesystem.release(fh)

    # ------------------------------------------------------------------ namespace changes
    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.filesystem.unlink(parent_inode, _decode(name))

    @fuse_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        await self.filesystem.rename(parent_inode_old, _decode(name_old), parent_inode_new,
                                     _decode(name_new), ctx.pid,
                                     noreplace=bool(flags & pyfuse3.RENAME_NOREPLACE),
                                     exchange=bool(flags & pyfuse3.RENAME_EXCHANGE))

    # ------------------------------------------------------------------ xattrs & statfs
    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        return (await self.filesystem.getxattr(inode, _decode(name), ctx.pid)).encode()

    @fuse_errors
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return [k.encode() for k in await self.filesystem.listxattr(inode, ctx.pid)]

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        await self.filesystem.setxattr(inode, _decode(name), _decode(value))

    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        raise pyfuse3.FUSEError(errno.EOPNOTSUPP)

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = BLOCK_SIZE
        s.f_blocks = s.f_bfree = s.f_bavail = 1 << 30  # 1 PiB: backends report no capacity
        s.f_files = s.f_ffree = s.f_favail = 1 << 30
        s.f_namemax = 255
        return s
