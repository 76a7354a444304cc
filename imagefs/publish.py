"""When a writer's pending bytes become the image under its name, and when they never do.

The flush of a close publishes, unless the process that opened the image still holds another
descriptor open on it (a dup, or a copy inherited across fork+exec: only its last close
publishes) or is dying from a signal (it publishes nothing). The last release publishes what a
flush did not, unless an earlier publish failed, then drops the writer's spool or upload. A
writer whose image was unlinked meanwhile publishes nothing: the bytes have no name any more.
See doc/SEMANTICS.md, "When an image becomes visible" and "What fsync and close report".
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from imagefs import bridge
from imagefs.background_hash import BackgroundHasher
from imagefs.catalog import Catalog
from imagefs.handles import Handle, Handles
from imagefs.hashing import META_VALUE
from imagefs.inodes import InodeTable, Node
from imagefs.procfs import killed_by, still_open_by
from imagefs.stores.base import ImageInfo, Store
from imagefs.writer import Writer, WriterSettings, WriterState

log = logging.getLogger(__name__)


class Publisher:
    def __init__(self, stores: dict[str, Store], catalogs: dict[str, Catalog],
                 inodes: InodeTable, handles: Handles, settings: WriterSettings,
                 mountpoint: str) -> None:
        self.stores = stores
        self.settings = settings
        self.catalogs = catalogs
        self.inodes = inodes
        self.handles = handles
        #: Where ``still_open_by`` looks for other descriptors; "" checks none (no kernel).
        self.mountpoint = mountpoint
        #: Hashes images published without them (set when the mount starts).
        self.background_hash: BackgroundHasher | None = None

    def published(self, node: Node, info: ImageInfo) -> None:
        """``info`` is now the image under ``node``'s name."""
        self.catalogs[node.store_id].put(info)
        node.info = info
        node.cached_version = None
        log.info("published %s/%s (%d bytes)", node.store_id, info.name, info.size)
        if META_VALUE not in info.meta and self.background_hash is not None:
            self.background_hash.submit(self.stores[node.store_id], info)

    async def set_meta(self, node: Node, store: Store, meta: Mapping[str, str],
                       expect: str | None = None) -> None:
        """Change a published image's metadata; an idle writer then starts from the result
        (S3 changes metadata by a copy: a new version, made in as long as a commit may take).
        """
        assert node.name is not None
        size = node.info.size if node.info else 0
        info = await bridge.call(store, store.set_meta, node.name, meta, expect,
                                 timeout=self.settings.long_timeout(store, size))
        self.catalogs[store.id].put(info)
        node.info = info
        w = node.writer
        if w is not None and not w.dirty and w.base is not None:
            w.base = info

    async def publish(self, h: Handle) -> None:
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
            self.published(h.node, info)

    async def flush(self, h: Handle) -> None:
        if h.writer is None or not h.writer.dirty:
            return
        if await self.writer_killed(h):
            return
        if h.pid and h.node.name is not None and self.mountpoint:
            path = os.path.join(self.mountpoint, h.store.id, h.node.name)
            if await bridge.local(still_open_by, h.pid, path, h.node.ino):
                log.debug("%s: flush from another descriptor copy; not publishing yet", path)
                return
        await self.publish(h)

    async def writer_killed(self, h: Handle) -> bool:
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

    async def release(self, fh: int) -> None:
        h = self.handles.pop(fh)
        if h is None:
            return
        node = h.node
        if h.reader is not None:
            node.readers.remove(h)
        w = h.writer
        if w is not None and not self.handles.shared(w):
            w.closing = True  # before any await: from now on nobody joins w
            try:
                await self._last_close(h, w)
            finally:
                if node.writer is w:
                    node.writer = None
                w.closed.set()
        self.inodes.closed(node)

    async def _last_close(self, h: Handle, w: Writer) -> None:
        """The last close of ``w``: publish what it holds (unless its process was killed, or
        an earlier write or publish failed), then drop its spool or upload."""
        await self.writer_killed(h)
        if w.dirty and h.node.name is not None:
            if w.state is not WriterState.OPEN:  # publishing would fail the same way
                log.error("%s/%s: %s (%s); the new bytes are discarded", h.store.id, w.name,
                          w.state.value, w.error)
            else:
                try:
                    await self.publish(h)
                except Exception:
                    log.error("%s/%s: last close could not publish; the new bytes are "
                              "discarded", h.store.id, w.name)
        await w.discard()

    async def drain(self) -> None:
        """Discard every unpublished writer (unmount): nothing partial may become visible."""
        for w in self.handles.writers():
            if w.dirty:
                log.warning("%s/%s: unmounted while still open for writing; not published",
                            w.store.id, w.name)
            await w.discard()
        self.handles.clear()
