"""Per-store metadata cache: what images exist and their ``ImageInfo``, for ``metadata_ttl``.

``ls -l`` and ``stat`` must not cost a backend round trip per image per call: listing results
fill the cache, single lookups fall back to ``store.stat``. imagefs's own changes (publish,
rename, delete, set_meta) update it at once, so a mount sees its own writes immediately.
"""

from __future__ import annotations

import time

from imagefs import bridge
from imagefs.stores.base import ImageInfo, NotFound, Store


class Catalog:
    def __init__(self, store: Store, ttl: float) -> None:
        self.store = store
        self.ttl = ttl
        self._entries: dict[str, tuple[ImageInfo, float]] = {}
        self._listing: list[str] | None = None
        self._listed_at = 0.0

    def _fresh(self, at: float) -> bool:
        return time.monotonic() - at < self.ttl

    async def stat(self, name: str, fresh: bool = False) -> ImageInfo:
        """``fresh`` asks the backend even within the TTL: an open must pin the version the
        backend holds now, or a replaced image would fail its first read."""
        hit = self._entries.get(name)
        if not fresh and hit is not None and self._fresh(hit[1]):
            return hit[0]
        if (not fresh and self._listing is not None and self._fresh(self._listed_at)
                and hit is None):
            raise NotFound(name)
        try:
            info = await bridge.call(self.store, self.store.stat, name)
        except NotFound:
            self.forget(name)
            raise
        self.put(info)
        return info

    async def list(self) -> list[ImageInfo]:
        if self._listing is not None and self._fresh(self._listed_at):
            return [self._entries[n][0] for n in self._listing if n in self._entries]
        def listing() -> list[ImageInfo]:  # named: a deadline's error says "listing"
            return list(self.store.list())

        infos = await bridge.call(self.store, listing)
        now = time.monotonic()
        self._entries = {i.name: (i, now) for i in infos}
        self._listing = [i.name for i in infos]
        self._listed_at = now
        return infos

    def put(self, info: ImageInfo) -> None:
        self._entries[info.name] = (info, time.monotonic())
        if self._listing is not None and info.name not in self._listing:
            self._listing.append(info.name)

    def forget(self, name: str) -> None:
        self._entries.pop(name, None)
        if self._listing is not None and name in self._listing:
            self._listing.remove(name)
