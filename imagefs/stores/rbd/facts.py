"""The stat cache: per-image facts (size, metadata, Glance's snapshot) by (name, image id).

``list()`` gets names and ids in one call (``list2``); the per-image facts (size, metadata)
need an image open each (up to 8 at once), so they are cached per (name, id) for ``stat_ttl``
seconds, on top of the mount's own ``metadata_ttl`` catalog. A replaced image has a new id,
so the cache can only be stale about changes made by *other* clients to metadata
(mtime/mode/hashes) or to size in place, and only for ``stat_ttl``. imagefs's own changes
update it at once. ``stat()`` of a cached image costs one small read (``rbd_id.<name>``).

Whether an image has Glance's snapshot (what ``location`` needs) is remembered the same way,
per image id for ``stat_ttl``: others may add the snapshot.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from imagefs.stores.base import ImageInfo
from imagefs.stores.rbd.cluster import Client, close_image
from imagefs.stores.rbd.layout import has_snap, image_info

#: Snapshot facts kept at most (oldest dropped first).
MAX_SNAPPED = 4096


class Facts:
    """The cache; ``lock`` is the store's cache lock."""

    def __init__(self, store_id: str, client: Client, stat_ttl: float,
                 lock: threading.Lock) -> None:
        self.store_id = store_id
        self.client = client
        self.stat_ttl = stat_ttl
        self._lock = lock
        self._stats: dict[str, tuple[float, ImageInfo]] = {}
        #: name -> (image id, has the snapshot ``snap``, monotonic time seen)
        self._snapped: dict[str, tuple[str, bool, float]] = {}

    def info(self, name: str, image: Any) -> ImageInfo:
        """The facts of an open image (noting its snapshot on the way)."""
        self._note_snap(name, image)
        return image_info(name, image)

    def remember(self, info: ImageInfo, has_snap: bool | None = None) -> None:
        """Cache ``info``; ``has_snap``: also whether it has the snapshot (just published)."""
        with self._lock:
            self._stats[info.name] = (time.monotonic(), info)
            if has_snap is not None:
                self._snapped[info.name] = (info.version, has_snap, time.monotonic())

    def cached(self, name: str, image_id: str) -> ImageInfo | None:
        with self._lock:
            hit = self._stats.get(name)
        if hit and hit[1].version == image_id and time.monotonic() - hit[0] < self.stat_ttl:
            return hit[1]
        return None

    def forget(self, name: str) -> None:
        with self._lock:
            self._stats.pop(name, None)
            self._snapped.pop(name, None)

    def keep_only(self, names: list[str]) -> None:
        """Drop the facts of images no longer listed."""
        with self._lock:
            for gone in set(self._stats) - set(names):
                del self._stats[gone]

    def clear(self) -> None:
        """Drop the image facts (caller holds the lock: a new client, see ``Client``)."""
        self._stats.clear()

    def fresh(self, name: str) -> ImageInfo:
        """Read the facts from the image, and cache them."""
        image = self.client.open_image(name)
        try:
            info = self.info(name, image)
        except Exception as e:
            raise self.client.err(e, f"{self.store_id}/{name}") from None
        finally:
            close_image(image)
        self.remember(info)
        return info

    def _note_snap(self, name: str, image: Any) -> bool:
        """Remember whether ``image`` (open, called ``name``) has Glance's snapshot (read from
        the header the open loaded: no extra round trip)."""
        has = has_snap(image)
        with self._lock:
            if len(self._snapped) >= MAX_SNAPPED:
                self._snapped.pop(next(iter(self._snapped)))
            self._snapped[name] = (image.id(), has, time.monotonic())
        return has

    def has_glance_snap(self, name: str) -> bool:
        """Whether the image now called ``name`` has the snapshot ``snap``: remembered per
        image id for ``stat_ttl`` (one small read to check the id), else read from the image."""
        image_id = self.client.image_id(name)
        with self._lock:
            hit = self._snapped.get(name)
        if hit is not None and hit[0] == image_id and \
                time.monotonic() - hit[2] < self.stat_ttl:
            return hit[1]
        image = self.client.open_image(name)
        try:
            return self._note_snap(name, image)
        except Exception as e:
            raise self.client.err(e, f"{self.store_id}/{name}: snapshots") from None
        finally:
            close_image(image)
