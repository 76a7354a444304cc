"""Extended attributes: facts about stores and images, the hashes Glance wants, and the
location glance_store can use.

``user.imagefs.*`` on a store directory describes the store; on an image, its store, version,
location (no secrets) and hashes. Only the hashes are settable, and ``user.imagefs.discard``
on an image open for writing drops its pending bytes. ``GLANCE_XATTR`` holds what
glance_store needs, credentials included where its driver needs them (S3): only callers with
CAP_SYS_ADMIN get it.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from imagefs import bridge
from imagefs.errors import FsError
from imagefs.hashing import parse_hashes
from imagefs.procfs import has_sys_admin
from imagefs.stores.base import Changed, Store, StoreError

if TYPE_CHECKING:
    from imagefs.filesystem import FileSystem

log = logging.getLogger(__name__)

SETTABLE_META = ("os_hash_algo", "os_hash_value", "checksum")
#: The location glance_store can use, credentials included where its driver needs them (S3):
#: in the ``trusted.`` namespace, which the kernel lets only CAP_SYS_ADMIN read or list.
GLANCE_XATTR = "trusted.imagefs.glance_location"
LOCATION = "user.imagefs.location"


class Xattrs:
    def __init__(self, fs: FileSystem) -> None:
        self.fs = fs

    def _of_store(self, store: Store) -> dict[str, str]:
        return {
            "user.imagefs.type": store.type_name,
            "user.imagefs.description": store.description,
            "user.imagefs.default": "true" if store.default else "false",
            "user.imagefs.read_only": "true" if self.fs.settings.read_only_for(store)
            else "false",
            "user.imagefs.weight": str(store.weight),
            "user.imagefs.hash_algo": self.fs.settings.writer.hash_algo,
        }

    async def _all(self, inode: int, location: bool = True) -> Mapping[str, str]:
        """The attributes of a store directory or image; ``location=False`` skips the one that
        may cost a backend call (rbd), for a getxattr of another name (ls asks for ACLs)."""
        inodes = self.fs.inodes
        if inode in inodes.ino_store:
            return self._of_store(self.fs.stores[inodes.ino_store[inode]])
        node = inodes.node(inode)
        if node is None or node.name is None:
            return {}
        store = self.fs.stores[node.store_id]
        info = await self.fs.catalogs[store.id].stat(node.name)
        out = {"user.imagefs.store": store.id, "user.imagefs.version": info.version}
        try:  # off the trio thread: rbd may have to look at the image's snapshots
            if location:
                out[LOCATION] = await bridge.call(store, store.location, node.name)
        except StoreError as e:  # Glance has no form for it: no location, never a wrong one
            log.debug("%s/%s: no location: %s", store.id, node.name, e)
        for key in SETTABLE_META:
            if key in info.meta:
                out[f"user.imagefs.{key}"] = info.meta[key]
        return out

    async def _glance_location(self, inode: int, pid: int) -> str | None:
        """``GLANCE_XATTR``: the location glance_store can use, secrets and all (S3), for
        callers with CAP_SYS_ADMIN only. The kernel already refuses ``trusted.*`` to anyone
        else before asking us; checking the caller's capabilities here too keeps the secret
        in the daemon if the mount is ever reached some other way (a user namespace)."""
        node = self.fs.inodes.node(inode)
        if inode in self.fs.inodes.ino_store or node is None or node.name is None:
            return None
        if not await bridge.local(has_sys_admin, pid):
            log.warning("%s: refused to process %d (no CAP_SYS_ADMIN)", GLANCE_XATTR, pid)
            return None
        store = self.fs.stores[node.store_id]
        await self.fs.catalogs[store.id].stat(node.name)  # ENOENT for a name that is gone
        try:
            return await bridge.call(store, store.glance_location, node.name)
        except StoreError as e:
            log.info("%s/%s: no Glance location: %s", store.id, node.name, e)
            return None

    async def get(self, inode: int, key: str, pid: int) -> str:
        if key == GLANCE_XATTR:
            value = await self._glance_location(inode, pid)
        else:
            value = (await self._all(inode, location=key == LOCATION)).get(key)
        if value is None:
            raise FsError(errno.ENODATA)
        return value

    async def names(self, inode: int, pid: int) -> list[str]:
        """``GLANCE_XATTR`` is listed only to callers who may read it (as ext4 lists
        ``trusted.*`` only to CAP_SYS_ADMIN), and only where the image has a location."""
        names = list(await self._all(inode))
        if LOCATION in names and await bridge.local(has_sys_admin, pid):
            names.append(GLANCE_XATTR)
        return names

    async def set(self, inode: int, name: str, value: str) -> None:
        """Only the hash attributes are settable: one at a time, or all three at once as
        ``user.imagefs.hashes`` (what ``imagefs hash`` sets), refused with ESTALE when the
        image is no longer the version they were computed from. ``user.imagefs.discard`` on a
        file open for writing drops its pending bytes, so a writer that failed half-way
        (``imagefs copy``) can close without publishing."""
        key = name.removeprefix("user.imagefs.")
        node = self.fs.inodes.node(inode)
        if key == "discard" and node is not None:
            w = node.writer
            if w is None:
                raise FsError(errno.EINVAL)  # nothing pending to discard
            log.info("%s/%s: pending bytes discarded on request", w.store.id, w.name)
            await w.cancel()
            return
        if (key not in SETTABLE_META and key != "hashes") or node is None or node.name is None:
            raise FsError(errno.EOPNOTSUPP)
        store = self.fs.stores[node.store_id]
        if self.fs.settings.read_only_for(store):
            raise FsError(errno.EROFS)
        meta, version = {key: value}, None
        if key == "hashes":
            try:
                version, meta = parse_hashes(value)
            except ValueError as e:
                log.warning("%s/%s: user.imagefs.hashes refused: %s", store.id, node.name, e)
                raise FsError(errno.EINVAL) from None
        try:
            await self.fs.publisher.set_meta(node, store, meta, version)
        except Changed as e:
            self.fs.catalogs[store.id].forget(node.name)
            log.warning("%s/%s: hashes not stored: they were computed from version %s (%s)",
                        store.id, node.name, version, e)
            raise FsError(errno.ESTALE) from None
