"""Giving a volume an image's name, replacing the volume that has it; what must not be changed.

Publishing and replacing
    A volume gets its name (and, at commit, its whole metadata) in one ``PUT /volumes/<id>``.
    Replacing an existing image first tags it ``imagefs-replaced-by = <new id>`` (so it stops
    counting the moment the new one has the name, see ``layout.py``), then renames, then
    deletes it. A crash leaves a tagged volume: ``cleanup_leftovers`` (``leftovers.py``)
    deletes it if its replacement has the name, and untags it otherwise.

Refusals
    A read-only volume (Glance marks finished images read-only) is never replaced, renamed or
    deleted: EROFS, and a log line saying how to clear the flag; metadata (chmod, touch,
    hashes) may still change. A volume attached by anyone else (a VM, another imagefs) is not
    replaced or deleted: EBUSY. Delete waits until Cinder has removed the volume; before it,
    if the image's pool is known, RBD watchers (clients that opened it read-write without an
    attachment) also make it EBUSY: Cinder 21 would not refuse, it would move the image to the
    pool's trash.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from imagefs.stores.base import Busy, NotFound, ReadOnly, StoreError
from imagefs.stores.cinder.api import message
from imagefs.stores.cinder.layout import REPLACED_KEY, cinder_name, named_meta, readonly

if TYPE_CHECKING:
    from imagefs.stores.cinder.store import CinderStore

log = logging.getLogger(__name__)


class Replacer:
    """Publishing, replacing and the refusals of one store."""

    def __init__(self, store: CinderStore) -> None:
        self.store = store
        self.store_id = store.id

    def refuse_readonly(self, v: Mapping[str, Any], name: str, what: str) -> None:
        """ReadOnly (and a log line saying how to allow it) for a read-only volume."""
        if readonly(v):
            log.warning("store %s: %s is read-only volume %s in Cinder (Glance marks finished "
                        "images read-only): not %s it; `cinder readonly-mode-update %s false` "
                        "allows it", self.store_id, name, v["id"], what, v["id"])
            raise ReadOnly(f"{self.store_id}/{name}: volume {v['id']} is read-only in Cinder")

    def check_replaceable(self, v: Mapping[str, Any], name: str, what: str) -> None:
        """ReadOnly or Busy if the image's volume must not be replaced or deleted."""
        self.refuse_readonly(v, name, what)
        others = self.store.layout.foreign_attachments(v, imagefs_too=True)
        if others:
            hosts = ", ".join(str(a.get("host_name") or a.get("server_id")) for a in others[:5])
            log.warning("store %s: %s (volume %s) is attached by %s: not %s it", self.store_id,
                        name, v["id"], hosts, what)
            raise Busy(f"{self.store_id}/{name}: volume {v['id']} is in use ({hosts})")

    def check_watchers(self, v: Mapping[str, Any], name: str) -> None:
        """Busy if a librbd client has the image open read-write without an attachment."""
        store = self.store
        spec = store.readers.known_spec(v)
        if spec is None or store.rbdio.cluster is None:
            return  # RBD image unknown (nothing attached yet): Cinder's own checks only
        try:
            watchers = store.rbdio.watchers(spec)
        except NotFound:
            return
        if watchers:
            log.warning("store %s: %s (volume %s) is open in librbd by %s: not deleting it",
                        self.store_id, name, v["id"], ", ".join(watchers[:5]))
            raise Busy(f"{self.store_id}/{name}: RBD image {spec[2]} is in use "
                       f"({len(watchers)} watchers)")

    def publish(self, vid: str, name: str, meta: dict[str, str] | None) -> dict[str, Any]:
        """Give volume ``vid`` the name (and, if given, its whole metadata) in one PUT,
        replacing the image that has that name now (see the module docstring)."""
        store = self.store
        api = store.api
        olds = [v for v, _ in store.layout.pick(store.named(name)).values() if v["id"] != vid]
        for v in olds:
            self.check_replaceable(v, name, "replacing")
        tagged = []
        try:
            for v in olds:
                api.request("POST", f"/volumes/{v['id']}/metadata",
                            body={"metadata": {REPLACED_KEY: vid}},
                            what=f"marking {name} ({v['id']}) as being replaced")
                tagged.append(v)
            update: dict[str, Any] = {"name": cinder_name(name)}
            if meta is not None:
                update["metadata"] = named_meta(meta, name)  # replaces all of it
            try:
                new = api.request("PUT", f"/volumes/{vid}", body={"volume": update},
                                  what=f"publishing {name}")["volume"]
            except StoreError:
                new = api.volume(vid)  # a PUT that timed out may still have happened
                if store.layout.display(new) != name:
                    raise  # the PUT's error
        except BaseException:
            for v in tagged:
                self.untag(v["id"])
            raise
        for v in olds:
            try:
                store.readers.drop(v["id"])
                store.volumes.delete(v["id"], wait=False, what=f"{name}'s old volume {v['id']}")
            except StoreError as e:
                log.warning("store %s: replaced %s but could not remove its old volume %s: %s "
                            "(hidden; removed at next mount)", self.store_id, name, v["id"], e)
        return dict(new)

    def untag(self, vid: str) -> None:
        status, data = self.store.api.call("DELETE", f"/volumes/{vid}/metadata/{REPLACED_KEY}",
                                           what=f"untagging {vid}")
        if status not in (200, 204, 404):
            log.warning("store %s: could not remove %s from volume %s: HTTP %s %s (removed at "
                        "next mount)", self.store_id, REPLACED_KEY, vid, status, message(data))
