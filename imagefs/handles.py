"""Open file handles, and the rules for sharing a node's writer between them.

Every descriptor open for writing on one image shares one pending version (a ``Writer`` on the
node). Joining, changing or replacing that writer must not race its last release, which
publishes and then drops its spool or upload: those rules are here (``settled_writer``,
``between_releases``, ``joinable_writer``), beside the handle table they are about.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from imagefs import bridge
from imagefs.errors import FsError
from imagefs.inodes import Node
from imagefs.procfs import process_of
from imagefs.reader import Reader
from imagefs.stores.base import Store
from imagefs.writer import Writer

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(eq=False)
class Handle:
    node: Node
    store: Store
    reader: Reader | None = None
    writer: Writer | None = None
    pid: int = 0  # the process that opened it
    #: A reader whose reads the kernel serves from its page cache, capped at the inode's size.
    cached: bool = False


@dataclass(frozen=True)
class PendingImage:
    """An image being written and not yet published, for ``imagefs status``."""

    store_id: str
    name: str
    size: int
    #: Its last close is publishing it now.
    publishing: bool


@dataclass(frozen=True)
class Activity:
    """What a mount holds open right now (imagefs.status)."""

    open_handles: dict[str, int]
    pending: list[PendingImage]


class Handles:
    """File handle numbers → handles (directory listings draw numbers from here too)."""

    def __init__(self) -> None:
        self._by_fh: dict[int, Handle] = {}
        self._next_fh = 1

    def new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def add(self, h: Handle) -> int:
        fh = self.new_fh()
        self._by_fh[fh] = h
        h.node.opens += 1
        if h.reader is not None:
            h.node.readers.append(h)
        return fh

    def get(self, fh: int) -> Handle:
        h = self._by_fh.get(fh)
        if h is None:
            raise FsError(errno.EBADF)
        return h

    def own(self, fh: int | None) -> Handle | None:
        """The handle a request names, if it names one that is open."""
        return self._by_fh.get(fh) if fh is not None else None

    def pop(self, fh: int) -> Handle | None:
        return self._by_fh.pop(fh, None)

    def shared(self, w: Writer) -> bool:
        """Another open handle still writes through ``w``."""
        return any(o.writer is w for o in self._by_fh.values())

    def writer_pids(self, w: Writer) -> set[int]:
        """The processes holding ``w`` open for writing."""
        return {h.pid for h in self._by_fh.values() if h.writer is w and h.pid}

    def writers(self) -> list[Writer]:
        return list({id(h.writer): h.writer for h in self._by_fh.values() if h.writer}.values())

    def clear(self) -> None:
        self._by_fh.clear()

    def activity(self) -> Activity:
        """Safe from any thread: ``list()`` copies the table in one step under the GIL."""
        handles = list(self._by_fh.values())
        counts: dict[str, int] = {}
        pending: dict[int, PendingImage] = {}
        for h in handles:
            counts[h.store.id] = counts.get(h.store.id, 0) + 1
            w = h.writer
            if w is not None and w.dirty and id(w) not in pending:
                pending[id(w)] = PendingImage(h.store.id, w.name, w.size, bool(w.closing))
        return Activity(counts, list(pending.values()))


async def caller_process(pid: int) -> int:
    """The process a FUSE request's thread ``pid`` belongs to (/proc, off the trio thread):
    handles remember the process, which every thread of a writer shares."""
    return await bridge.local(process_of, pid)


# ---------------------------------------------------------------------- sharing a writer
def pending(node: Node) -> bool:
    """A new image being written: nothing is published under its name yet."""
    return node.writer is not None and not node.writer.name_shows_image


def joinable_writer(node: Node) -> Writer | None:
    """The writer a new write handle on ``node`` shares, or None to start a new one.

    A writer whose pending bytes are lost (a write or publish failed, or it was
    discarded) is left to the handles that have it: they can only fail. A new open
    starts afresh, or every later close of the image would fail too."""
    w = node.writer
    if w is None:
        return None
    if w.private:
        raise FsError(errno.EBUSY)  # truncate(2) in progress
    assert not w.closing, "callers wait for a closing writer first (settled_writer)"
    return None if w.lost else w


async def settled_writer(node: Node) -> Writer | None:
    """``node``'s writer once no release is under way on it.

    The last close of a writer publishes, then discards its spool or upload; a handle
    joining it meanwhile would write into a discarded spool and publish zeros (fsx -c,
    qemu-img reopening a file). Whoever would join, change or replace ``node``'s writer
    waits here, then starts from what that release published."""
    while node.writer is not None and node.writer.closing:
        await node.writer.closed.wait()
    return node.writer


def closing(node: Node) -> bool:
    return node.writer is not None and node.writer.closing


async def between_releases(node: Node, step: Callable[[], Awaitable[T]]) -> T:
    """Run ``step`` (a lookup that awaits) until no release of ``node``'s writer began
    while it ran, so what it found still holds while the caller goes on without an
    await (see ``settled_writer``)."""
    while True:
        await settled_writer(node)
        result = await step()
        if not closing(node):
            return result


def refuse_shrink_under_readers(node: Node, size: int, what: str) -> None:
    """ETXTBSY for making an image smaller than a version its readers read.

    Page-cache readers: the kernel takes the new size at once (O_TRUNC: 0) and stops them
    there, so they would copy the image short without an error. Direct readers (the
    default) would read on until the rewrite is published and then fail with EIO where
    their version is gone: a VM running from the image must not lose it to a ``cp`` over
    it. Replacing with a new file renamed over the old (rsync's way) is allowed: readers
    keep their version's bytes or get EIO, never a mix."""
    if size < max((h.reader.info.size for h in node.readers if h.reader is not None),
                  default=0):
        log.warning("%s/%s: %s refused (ETXTBSY): the image is open for reading; write a "
                    "new file and rename it over instead", node.store_id, node.name, what)
        raise FsError(errno.ETXTBSY)
