"""The crash journal: markers for segments at stake, deleting segments safely, and the clean-up
at mount of what a crash left.

Before an operation can orphan segments (an upload's first segment, replacing or deleting an
SLO, a rename) it writes a marker ``.imagefs-pending/<upload-id>`` in the segment container, a
JSON record naming the operation (``op``), the image and the segment groups at stake
(``groups``; a rename also its ``source`` and ``group``), and ``created``. It is removed when
the operation ends, but only once its groups are really gone (every DELETE worked, a new
listing is empty) and no segment PUT still runs. At mount, a marker whose writer is condemned
(``owners.condemned``: same host and its pid/start time no longer runs, or another host and
older than ``leftover_age``) has its groups deleted unless a manifest references them.

Segment groups are shared while a rename runs (two manifests, one group): before a delete or
replace deletes a group, every manifest is checked, and a group another manifest references is
kept (only the manifest goes).
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from imagefs.stores.base import HIDDEN_PREFIX, InvalidName, NotFound, StoreError
from imagefs.stores.owners import condemned, owner_state
from imagefs.stores.swift.connection import Connections
from imagefs.stores.swift.layout import Dlo
from imagefs.stores.swift.listing import Listing

log = logging.getLogger(__name__)

#: Marker objects in the segment container: ``.imagefs-pending/<upload-id>``.
PENDING_PREFIX = HIDDEN_PREFIX + "pending/"


class Journal:
    """Markers and safe deletion of segments, for one store's two containers."""

    def __init__(self, client: Connections, listing: Listing, segment_container: str,
                 leftover_age: float) -> None:
        self.client = client
        self.listing = listing
        self.container = listing.container
        self.segment_container = segment_container
        self.leftover_age = leftover_age

    @property
    def _id(self) -> str:
        return self.client.store_id

    # ------------------------------------------------------------------ markers
    def put_marker(self, uid: str, record: Mapping[str, Any]) -> None:
        body = json.dumps({**record, "created": time.time()}).encode()
        self.client.call(f"marker {uid}: PUT", "put_object", self.segment_container,
                         PENDING_PREFIX + uid, body, content_length=len(body),
                         content_type="application/json", write=True)

    def drop_marker(self, uid: str) -> None:
        self.client.delete_quietly(self.segment_container, PENDING_PREFIX + uid)

    # ------------------------------------------------------------------ deleting segments
    def delete_group(self, group: str, names: Iterable[str] = ()) -> tuple[int, bool]:
        """Delete every segment of ``group``: those a prefix listing shows and ``names`` (known
        to exist even if the listing lags), in parallel: (segments deleted, all gone). All gone
        only if every DELETE worked and a new listing shows none left: only then may the
        group's marker go."""
        todo = set(names)
        try:
            for page in self.client.iter_container(self.segment_container, prefix=group + "/"):
                todo.update(o["name"] for o in page if "name" in o)
        except StoreError as e:
            log.warning("store %s: segments of %s: %s", self._id, group, e)
            ok = False
        else:
            ok = True
        results = self.client.map(lambda o: self.client.gone(self.segment_container, o),
                                  sorted(todo))
        n = sum(r for r in results if r > 0)
        if not ok or -1 in results:
            return n, False
        try:
            left = next(self.client.iter_container(self.segment_container,
                                                   prefix=group + "/"), [])
        except StoreError:
            return n, False
        return n, not any(o.get("name") for o in left)

    def referenced(self, group: str, exclude: str | None = None) -> bool:
        """Whether a manifest other than ``exclude`` names ``group`` (every image is looked at,
        as ``cleanup_leftovers`` does): a copy (rename) shares its source's segments."""
        return any(g == group for info, g in self.listing.images() if info.name != exclude)

    def drop_group(self, group: str, marker_uid: str, exclude: str | None = None) -> None:
        """Delete the segments of a replaced or deleted SLO unless another manifest uses them,
        then the marker ``marker_uid`` — which stays if that failed (the next mount retries)."""
        try:
            if self.referenced(group, exclude):
                log.info("store %s: segments %s are still used by another manifest: kept",
                         self._id, group)
            elif not self.delete_group(group)[1]:
                log.warning("store %s: segments %s not all deleted; the clean-up at the next "
                            "mount retries", self._id, group)
                return
        except StoreError as e:
            log.warning("store %s: segments %s: %s; the clean-up at the next mount retries",
                        self._id, group, e)
            return
        self.drop_marker(marker_uid)

    def drop_dlo_segments(self, dlo: Dlo, exclude: str) -> None:
        """Delete the segments of a DLO whose manifest ``exclude`` was just deleted or
        replaced, except those another manifest still covers (a copy of the manifest shares
        them). Segments in another container are left alone: manifests there cannot be
        checked from this store."""
        if dlo.container != self.container:
            log.info("store %s: %s was a large object with segments in container %s: they "
                     "are kept", self._id, exclude, dlo.container)
            return
        others = [d for m, d in self.listing.dlo_manifests().items() if m != exclude]
        todo = [n for page in self.client.iter_container(self.container, prefix=dlo.prefix)
                for n in (str(o.get("name", "")) for o in page)
                if n and n != exclude and not any(d.covers(self.container, n) for d in others)]
        if not todo:
            return
        results = self.client.map(lambda o: self.client.gone(self.container, o), todo)
        self.listing.forget(*todo)
        if -1 in results:
            log.warning("store %s: %d of %d segments of %s (%s/%s*) could not be deleted: they "
                        "now show as images", self._id, results.count(-1), len(todo), exclude,
                        dlo.container, dlo.prefix)
        else:
            log.info("store %s: deleted the %d segments of %s", self._id, len(todo), exclude)

    # ------------------------------------------------------------------ leftovers
    def cleanup_leftovers(self, finish_rename: Callable[[Mapping[str, Any]], bool]) -> int:
        """Delete segment groups of operations whose owner is condemned and no manifest uses.

        Groups referenced by a manifest (a crash right after publishing) are kept: first the
        image the marker names is checked, then, if needed, every manifest. A rename marker is
        first settled by ``finish_rename`` (the rename protocol's part); if it cannot be, the
        marker stays for the next mount.
        """
        removed = 0
        referenced: set[str] | None = None
        for page in self.client.iter_container(self.segment_container, prefix=PENDING_PREFIX):
            for entry in page:
                mname = entry.get("name", "")
                uid = mname[len(PENDING_PREFIX):]
                state = owner_state(uid)
                if state == "alive":
                    continue
                try:
                    _, body = self.client.call(f"marker {uid}: GET", "get_object",
                                               self.segment_container, mname)
                    record = json.loads(body)
                    groups = [g for g in record.get("groups", []) if isinstance(g, str) and g]
                    image = record.get("image")
                except NotFound:
                    continue  # someone else cleaned it
                except ValueError:
                    groups, image, record = [], None, None
                # only another host's leftovers are judged by age: listing them costs requests
                age = self._age(entry, groups) if state == "elsewhere" else 0.0
                if not condemned(uid, age, self.leftover_age):
                    continue
                if (isinstance(record, dict) and record.get("op") == "rename"
                        and not finish_rename(record)):
                    continue  # try again at the next mount
                settled = True
                for group in groups:
                    in_use = False
                    if isinstance(image, str):
                        try:
                            in_use = self.listing.head(image, newest=True)[1] == group
                        except (NotFound, InvalidName):
                            in_use = False
                    if not in_use:
                        if referenced is None:
                            referenced = {g for _i, g in self.listing.images() if g}
                        in_use = group in referenced
                    if in_use:
                        continue
                    n, gone = self.delete_group(group)
                    if n:
                        removed += 1
                        log.info("store %s: removed segments %s/%s left by a crash", self._id,
                                 self.segment_container, group)
                    if not gone:
                        settled = False  # the marker stays: the next mount tries again
                if settled:
                    self.client.delete_quietly(self.segment_container, mname)
        return removed

    def _age(self, entry: Mapping[str, Any], groups: list[str]) -> float:
        """Seconds since the marker or any segment of its groups last changed."""
        newest = _iso_time(entry.get("last_modified"))
        for group in groups:
            for page in self.client.iter_container(self.segment_container, prefix=group + "/"):
                newest = max([newest, *(_iso_time(o.get("last_modified")) for o in page)])
        return time.time() - newest


def _iso_time(value: Any) -> float:
    """Listing times: '2024-01-02T03:04:05.678900' (Swift) or '...05.678Z' (RGW), UTC."""
    if not isinstance(value, str) or not value:
        return 0.0
    try:
        dt = datetime.datetime.fromisoformat(value.rstrip("Z"))
    except ValueError:
        return 0.0
    return dt.replace(tzinfo=datetime.UTC).timestamp()
