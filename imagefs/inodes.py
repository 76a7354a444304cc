"""Inode numbers ↔ (store id, image name), with the kernel's lookup counts.

Inode 1 is the root; store directories and the ``default`` link get fixed numbers right after
it, so they are stable across remounts. Image inodes are allocated on first sight and dropped
when the kernel forgets them and no handle is open, keeping memory proportional to what the
kernel holds, not to every image ever listed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from imagefs.handles import Handle
    from imagefs.stores.base import ImageInfo
    from imagefs.writer import Writer

#: The root directory's inode (FUSE_ROOT_ID).
ROOT = 1


@dataclass(eq=False)
class Node:
    ino: int
    store_id: str
    name: str | None  # None once unlinked or replaced while still referenced
    lookups: int = 0
    opens: int = 0
    #: Version whose pages the kernel may still cache (FOPEN_KEEP_CACHE when unchanged).
    cached_version: str | None = None
    #: Version whose attributes (size) the kernel was last given.
    reported_version: str | None = None
    #: Open read handles, so attribute replies need not scan every handle.
    readers: list[Handle] = field(default_factory=list)
    #: The pending new version the write handles on this node share.
    writer: Writer | None = None
    #: The published image as last seen (listing, lookup, stat, publish, rename); what an
    #: unlinked node still shows to the handles that hold it.
    info: ImageInfo | None = None


class InodeTable:
    def __init__(self, store_ids: list[str]) -> None:
        self.store_ino = {sid: ROOT + 1 + i for i, sid in enumerate(store_ids)}
        self.ino_store = {ino: sid for sid, ino in self.store_ino.items()}
        self.default_link = ROOT + 1 + len(store_ids)
        self._next = self.default_link + 1
        self._by_name: dict[tuple[str, str], Node] = {}
        self._by_ino: dict[int, Node] = {}

    def node(self, ino: int) -> Node | None:
        return self._by_ino.get(ino)

    def find(self, store_id: str, name: str) -> Node | None:
        return self._by_name.get((store_id, name))

    def get(self, store_id: str, name: str) -> Node:
        """The node for a name, created if new (without counting a lookup)."""
        node = self._by_name.get((store_id, name))
        if node is None:
            node = Node(self._next, store_id, name)
            self._next += 1
            self._by_name[(store_id, name)] = node
            self._by_ino[node.ino] = node
        return node

    def looked_up(self, node: Node) -> None:
        node.lookups += 1

    def forget(self, ino: int, count: int) -> None:
        node = self._by_ino.get(ino)
        if node is None:
            return
        node.lookups = max(0, node.lookups - count)
        self._maybe_drop(node)

    def closed(self, node: Node) -> None:
        node.opens -= 1
        self._maybe_drop(node)

    def _maybe_drop(self, node: Node) -> None:
        if node.lookups == 0 and node.opens == 0 and node.writer is None:
            self._by_ino.pop(node.ino, None)
            if node.name is not None and self._by_name.get((node.store_id, node.name)) is node:
                del self._by_name[(node.store_id, node.name)]

    def unlink(self, node: Node) -> None:
        """The name is gone; the node lives on only for open handles and kernel references."""
        if node.name is not None and self._by_name.get((node.store_id, node.name)) is node:
            del self._by_name[(node.store_id, node.name)]
        node.name = None
        self._maybe_drop(node)

    def rename(self, node: Node, new: str) -> None:
        """``node`` now carries ``new``; whatever had that name before is unlinked."""
        old = self._by_name.get((node.store_id, new))
        if old is not None and old is not node:
            self.unlink(old)
        if node.name is not None and self._by_name.get((node.store_id, node.name)) is node:
            del self._by_name[(node.store_id, node.name)]
        node.name = new
        self._by_name[(node.store_id, new)] = node
