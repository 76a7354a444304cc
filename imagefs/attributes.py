"""What ``stat`` shows: the attributes of the root, store directories, the ``default`` link
and images, as plain values (imagefs.fs turns them into the kernel's reply).

An image's attributes come from its published ``ImageInfo`` or, while it is being written,
from its writer; the rules for which one a node shows are in imagefs.filesystem
(``FileSystem.attr_of``). Store directories have nothing in the backend to keep a mode or
times in: what ``rsync -a`` sets on them is remembered here for the life of the mount.
"""

from __future__ import annotations

import stat
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from imagefs.inodes import InodeTable, Node
from imagefs.stores.base import META_GID, META_UID, ImageInfo, Store

if TYPE_CHECKING:
    from imagefs.filesystem import FsSettings
    from imagefs.writer import Writer

BLOCK_SIZE = 1 << 20


@dataclass(frozen=True)
class Attr:
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    atime_ns: int
    #: Also the change time.
    mtime_ns: int
    #: How long the kernel may keep this reply (entry and attributes alike).
    ttl: float
    size: int = 0
    blocks: int = 0


@dataclass(frozen=True)
class AttrChange:
    """A setattr request: each field the caller changes, None for the others."""

    size: int | None = None
    mode: int | None = None
    mtime_ns: int | None = None
    uid: int | None = None
    gid: int | None = None


def cached_sizes(node: Node) -> list[int]:
    """Sizes of the versions ``node``'s page-cache readers hold."""
    return [h.reader.info.size for h in node.readers if h.cached and h.reader is not None]


class Attributes:
    def __init__(self, settings: FsSettings, inodes: InodeTable, stores: dict[str, Store],
                 default_id: str | None) -> None:
        self.settings = settings
        self.inodes = inodes
        self.stores = stores
        self.default_id = default_id
        self._started = time.time_ns()
        self._dir_overrides: dict[int, dict[str, int]] = {}

    def _base(self, ino: int, mode: int, nlink: int, size: int = 0) -> Attr:
        return Attr(ino=ino, mode=mode, nlink=nlink, uid=self.settings.uid,
                    gid=self.settings.gid, atime_ns=self._started, mtime_ns=self._started,
                    ttl=self.settings.ttl, size=size)

    def directory(self, ino: int, store: Store | None) -> Attr:
        writable = store is not None and not self.settings.read_only_for(store)
        a = self._base(ino, stat.S_IFDIR | (0o755 if writable else 0o555), 2)
        over = self._dir_overrides.get(ino)
        if over:
            if "mtime_ns" in over:
                a = replace(a, mtime_ns=over["mtime_ns"])
            if "mode" in over:
                a = replace(a, mode=stat.S_IFDIR | over["mode"])
        return a

    def set_directory(self, ino: int, change: AttrChange) -> None:
        """``rsync -a SRC/ STORE/`` sets the directory's times and mode: accept and remember
        them for this mount."""
        over = self._dir_overrides.setdefault(ino, {})
        if change.mtime_ns is not None:
            over["mtime_ns"] = change.mtime_ns
        if change.mode is not None:
            over["mode"] = change.mode & 0o7777

    def link(self) -> Attr:
        return self._base(self.inodes.default_link, stat.S_IFLNK | 0o777, 1,
                          size=len(self.default_id or ""))

    def image(self, node: Node, info: ImageInfo) -> Attr:
        """``info`` as ``node`` shows it; the kernel is then known to hold its version."""
        mode = info.mode
        if self.settings.read_only_for(self.stores[node.store_id]):
            mode &= ~0o222
        uid, gid = self.settings.uid, self.settings.gid
        if info.meta.get(META_UID, "").isdigit():
            uid = int(info.meta[META_UID])
        if info.meta.get(META_GID, "").isdigit():
            gid = int(info.meta[META_GID])
        ns = int(info.mtime * 1e9)
        node.reported_version = info.version
        # The kernel ends page-cache reads at st_size: never below the version an open
        # page-cache reader holds (the image was replaced by a smaller one elsewhere; that
        # reader must get its bytes or EIO, not an early EOF).
        return Attr(ino=node.ino, mode=stat.S_IFREG | (mode & 0o7777),
                    nlink=1 if node.name is not None else 0, uid=uid, gid=gid,
                    atime_ns=ns, mtime_ns=ns, ttl=self.settings.ttl,
                    size=max([info.size, *cached_sizes(node)]), blocks=(info.size + 511) // 512)

    def of_writer(self, node: Node, w: Writer) -> Attr:
        """What the pending version shows: never cached by the kernel, it changes."""
        mtime = w.mtime if w.mtime is not None else time.time()
        info = ImageInfo(name=w.name, size=w.size, mtime=mtime, mode=w.mode,
                         meta=dict(w.owner))
        return replace(self.image(node, info), ttl=0)
