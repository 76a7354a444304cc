"""The rename protocol: copy the manifest, then delete the old name, with a crash journal.

A rename copies the manifest (not the data), so until the old name's DELETE two manifests share
a segment group. A marker (``op = "rename"``, see ``journal.py``) is written before the copy:
the next mount finishes a rename cut short by a crash (plain DELETE of the source, see
``finish``); any other failure after the copy removes the copy with a plain DELETE (never
``multipart-manifest=delete``: the segments belong to the source) unless the source is already
gone. A DLO is renamed the same way (its manifest is copied, its segments stay).
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Mapping
from typing import Any

from imagefs.stores.base import BackendError, ImageInfo, NotFound, StoreError
from imagefs.stores.owners import new_owner_id
from imagefs.stores.swift.connection import Connections
from imagefs.stores.swift.journal import Journal
from imagefs.stores.swift.layout import Dlo
from imagefs.stores.swift.listing import Listing

log = logging.getLogger(__name__)


class Renamer:
    """Renames within one container, and the settling of renames a crash cut short."""

    def __init__(self, client: Connections, listing: Listing, journal: Journal) -> None:
        self.client = client
        self.listing = listing
        self.journal = journal
        self.container = listing.container

    @property
    def _id(self) -> str:
        return self.client.store_id

    def rename(self, old: str, new: str) -> ImageInfo:
        """Copy the manifest to ``new``, then delete the old manifest only.

        A DLO replaced by the rename loses its segments, unless another manifest uses them. A
        segment of a DLO is never renamed, and nothing is renamed onto a DLO's prefix (Busy).
        """
        src, group, is_slo, dlo = self.listing.head_full(old, newest=True)
        manifests = self.listing.dlo_manifests()
        self.listing.refuse_if_segment(old, "rename", manifests)
        if new != old:
            self.listing.refuse_if_segment(new, "rename onto", manifests)
        target_group, target_dlo = self.listing.group_of_existing(new)
        replaces = target_group is not None and target_group != group
        uid = None
        if group is not None or replaces:
            uid = new_owner_id()
            self.journal.put_marker(uid, {"op": "rename", "image": new, "source": old,
                                          "group": group,
                                          "groups": [target_group] if replaces else []})
        source = "/" + urllib.parse.quote(self.container, safe="") + "/" + \
            urllib.parse.quote(old, safe="")
        try:
            # the manifest itself, not the concatenation, for an SLO and for a DLO
            self.client.call(f"{old} -> {new}: copy", "put_object", self.container, new, None,
                             headers={"X-Copy-From": source},
                             query_string="multipart-manifest=get" if is_slo or dlo else None,
                             write=True)
            info, _, _ = self.listing.head(new, newest=True)
            if info.version != src.version or info.size != src.size:
                raise BackendError(f"store {self._id}: rename {old} -> {new}: the copy differs "
                                   f"(ETag {info.version}, size {info.size}; source "
                                   f"{src.version}, {src.size})")
            try:
                self.client.call(f"{old}: DELETE", "delete_object", self.container, old,
                                 write=True)
            except NotFound:
                pass
        except BaseException:
            self.listing.forget(old, new)
            if dlo is not None:
                self._undo_dlo_copy(old, new, dlo)
            if group is not None and not self._undo_copy(old, new, group):
                raise  # the marker stays: the next mount settles it
            if uid is not None:
                if replaces:  # kept if ``new`` still holds it (the copy never happened)
                    assert target_group is not None
                    self.journal.drop_group(target_group, uid)
                else:
                    self.journal.drop_marker(uid)
            raise
        self.listing.forget(old, new)
        if uid is not None:
            if replaces:
                assert target_group is not None
                self.journal.drop_group(target_group, uid, exclude=new)
            else:
                self.journal.drop_marker(uid)
        if target_dlo is not None and target_dlo != dlo and old != new:
            try:
                self.journal.drop_dlo_segments(target_dlo, exclude=old)
            except StoreError as e:
                log.warning("store %s: segments of the large object %s replaced by a rename: "
                            "%s", self._id, new, e)
        return info

    def finish(self, record: Mapping[str, Any]) -> bool:
        """A rename cut short between its copy and its DELETE: if the source and the target
        both hold the segment group, delete the source's manifest (plain DELETE), as the rename
        would have. False if that failed."""
        old, new, group = record.get("source"), record.get("image"), record.get("group")
        if not (isinstance(old, str) and isinstance(new, str) and isinstance(group, str)):
            return True
        try:
            if not self._copy_exists(new, group) or not self._copy_exists(old, group):
                return True
            self.client.call(f"{old}: DELETE (finish a rename)", "delete_object",
                             self.container, old, write=True)
            log.info("store %s: finished the rename %s -> %s cut short by a crash", self._id,
                     old, new)
        except NotFound:
            pass
        except (StoreError, ValueError) as e:
            log.warning("store %s: rename %s -> %s left by a crash: %s", self._id, old, new, e)
            return False
        self.listing.forget(old)
        return True

    def _undo_dlo_copy(self, old: str, new: str, dlo: Dlo) -> None:
        """After a failed rename of a DLO: if ``old`` is still there, a manifest at ``new`` with
        the same prefix is our copy: plain-DELETE it (the segments stay ``old``'s)."""
        try:
            self.listing.head(old, newest=True)
            if self.listing.head_full(new, newest=True)[3] == dlo:
                self.client.call(f"{new}: DELETE (undo the copy)", "delete_object",
                                 self.container, new, write=True)
        except NotFound:
            pass
        except StoreError as e:
            log.warning("store %s: rename %s -> %s: could not undo the copy: %s", self._id, old,
                        new, e)

    def _copy_exists(self, name: str, group: str | None) -> bool:
        """Whether ``name`` holds a manifest of ``group`` (None: unknown, so yes)."""
        try:
            return group is not None and self.listing.head(name, newest=True)[1] == group
        except NotFound:
            return False
        except StoreError:
            return True

    def _undo_copy(self, old: str, new: str, group: str) -> bool:
        """After a failed rename: if ``old`` and ``new`` both hold ``group``, plain-DELETE
        ``new`` (never ``multipart-manifest=delete``: the segments are ``old``'s). True if no
        two manifests share the group now."""
        try:
            try:
                if self.listing.head(old, newest=True)[1] != group:
                    return True  # old is gone (its DELETE worked after all) or replaced
            except NotFound:
                return True
            if not self._copy_exists(new, group):
                return True
            self.client.call(f"{new}: DELETE (undo the copy)", "delete_object", self.container,
                             new, write=True)
            return True
        except NotFound:
            return True
        except StoreError as e:
            log.warning("store %s: rename %s -> %s: could not undo the copy: %s; the next "
                        "mount settles it", self._id, old, new, e)
            return False
