"""What the container holds: HEADs of images, the listing, and the DLO manifests among them.

A container listing has no user metadata (and on RGW no SLO sizes), so ``scan()`` HEADs each
entry, in parallel, and remembers the result keyed by the listing's (hash, last_modified,
bytes). A metadata POST changes ``last_modified`` in the listing (Swift and RGW both), so the
key is an exact change detector: after the first listing only changed entries cost a HEAD.

Listings leave out the objects a listed DLO of the container uses, and a remembered DLO is
HEADed again when its segments' listing keys change. Writing, renaming or deleting a name under
a DLO's prefix is refused (``Busy``): it would change that image. The checks find manifests
among the 0-byte entries of a listing (a manifest's own body is empty: Swift ignores it, Glance
and the swift CLI write none), so they cost one listing and HEADs only of 0-byte objects not
seen before.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import hashlib
import logging
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from imagefs.stores.base import Busy, ImageInfo, InvalidName, NotFound, check_name, is_hidden
from imagefs.stores.swift.connection import Connections
from imagefs.stores.swift.layout import Dlo, dlo_of, info_of

log = logging.getLogger(__name__)

#: One listing entry: (name, (hash, last_modified, bytes)).
Entry = tuple[str, tuple[Any, ...]]
#: What a HEAD told: (version, size, segment group, DLO).
Head = tuple[str, int, str | None, Dlo | None]


class Listing:
    """HEADs and listings of the image container, remembered by listing key."""

    def __init__(self, client: Connections, container: str) -> None:
        self.client = client
        self.container = container
        self._lock = threading.Lock()
        #: name -> (listing key, info, segment group, DLO, DLO segments' fingerprint)
        self.cache: dict[str, tuple[tuple[Any, ...], ImageInfo, str | None, Dlo | None,
                                    str | None]] = {}
        #: name -> what the last HEAD told, for the segment map.
        self.heads: dict[str, Head] = {}

    def info(self, name: str, headers: Mapping[str, str], manifest: bool = False
             ) -> tuple[ImageInfo, str | None, bool] | None:
        return info_of(f"store {self.client.store_id}", name, headers, manifest)

    # ------------------------------------------------------------------ HEAD
    def head_headers(self, name: str, newest: bool = False
                     ) -> tuple[Mapping[str, str], tuple[ImageInfo, str | None, bool]]:
        """HEAD ``name``: its headers and what ``layout.info_of`` makes of them.

        First the manifest only (``?multipart-manifest=get``; plain objects answer as usual):
        RGW 16.2 answers a full HEAD of an SLO at once but then reads the whole object on that
        connection (≈0.6 s per GiB here, charged to the next request); our SLOs carry their
        size and ETag in metadata, so only foreign SLOs need the full HEAD as well.
        """
        headers = {"X-Newest": "true"} if newest else None
        h = self.client.call(f"{name}: HEAD", "head_object", self.container, name,
                             headers=headers, query_string="multipart-manifest=get")
        parsed = self.info(name, h, manifest=True)
        if parsed is None:
            h = self.client.call(f"{name}: HEAD", "head_object", self.container, name,
                                 headers=headers)
            parsed = self.info(name, h)
            assert parsed is not None
        return h, parsed

    def head(self, name: str, newest: bool = False) -> tuple[ImageInfo, str | None, bool]:
        return self.head_full(name, newest)[:3]

    def head_full(self, name: str, newest: bool = False
                  ) -> tuple[ImageInfo, str | None, bool, Dlo | None]:
        """``head`` and the DLO the object is, if it is one."""
        h, (info, group, is_slo) = self.head_headers(name, newest)
        dlo = dlo_of(h)
        self.remember_head(name, (info.version, info.size, group, dlo))
        return info, group, is_slo, dlo

    def remember_head(self, name: str, head: Head) -> None:
        with self._lock:
            if len(self.heads) >= 1024:
                self.heads.pop(next(iter(self.heads)))
            self.heads[name] = head

    def last_head(self, name: str) -> Head | None:
        with self._lock:
            return self.heads.get(name)

    def group_of_existing(self, name: str) -> tuple[str | None, Dlo | None]:
        """The segment group of the image now called ``name`` if it is one of our SLOs, and
        its DLO if it is one (replacing it must not leave its segments behind as images)."""
        try:
            _, group, _, dlo = self.head_full(name, newest=True)
        except NotFound:
            return None, None
        return group, dlo

    def forget(self, *names: str) -> None:
        with self._lock:
            for n in names:
                self.cache.pop(n, None)

    # ------------------------------------------------------------------ listing
    def images(self, hide_segments: bool = False) -> Iterator[tuple[ImageInfo, str | None]]:
        """Every image with its segment group (see ``scan``)."""
        for info, group, _dlo in self.scan(hide_segments):
            yield info, group

    def entries(self) -> list[Entry]:
        """Every object of the container as (name, listing key), in name order. The key
        (hash, last_modified, bytes) changes with every PUT and POST of the object."""
        every = [(str(o["name"]), (o.get("hash"), o.get("last_modified"), o.get("bytes")))
                 for page in self.client.iter_container(self.container) for o in page
                 if o.get("name")]
        every.sort()  # the servers' byte order is code point order; sorted() makes sure
        return every

    @staticmethod
    def covered(every: list[Entry], names: list[str], prefix: str) -> list[Entry]:
        """The entries of ``every`` (sorted, ``names`` its names) whose names start with
        ``prefix``: a DLO's segments as this listing sees them."""
        i = bisect.bisect_left(names, prefix)
        j = i
        while j < len(names) and names[j].startswith(prefix):
            j += 1
        return every[i:j]

    def scan(self, hide_segments: bool = True
             ) -> list[tuple[ImageInfo, str | None, Dlo | None]]:
        """Every image with its segment group and DLO, HEADing only entries that changed.

        A listing has no user metadata (and on RGW no SLO or DLO sizes), so each entry is
        HEADed once and remembered by its listing key. A DLO's bytes change when its segments
        do, not its manifest, so a remembered DLO also keeps a fingerprint of its segments'
        listing keys (segments in this container; a DLO whose segments are elsewhere is HEADed
        every time). ``hide_segments``: leave out the objects a listed DLO of this container
        uses as segments (Glance's ``<id>-00001``...), as SLO segments never show: they are
        parts of an image, not images.
        """
        every = self.entries()
        names = [n for n, _ in every]

        def fingerprint(dlo: Dlo | None) -> str | None:
            if dlo is None or dlo.container != self.container:
                return None
            return hashlib.md5(repr(self.covered(every, names, dlo.prefix)).encode(),
                               usedforsecurity=False).hexdigest()

        found: dict[str, tuple[ImageInfo, str | None, Dlo | None]] = {}
        todo: dict[str, tuple[tuple[Any, ...], Any]] = {}
        pool = self.client.pool
        for name, key in every:
            if is_hidden(name):
                continue
            try:
                check_name(name)
            except InvalidName:
                continue  # names with '/', too long...: not images of a flat store
            with self._lock:
                hit = self.cache.get(name)
            if hit is not None and hit[0] == key and (
                    hit[3] is None or (hit[4] is not None and hit[4] == fingerprint(hit[3]))):
                found[name] = (hit[1], hit[2], hit[3])
            elif pool is not None:
                todo[name] = (key, pool.submit(self._head_for_listing, name))
            else:
                todo[name] = (key, self._head_for_listing(name))
        for name, (key, item) in todo.items():
            if isinstance(item, concurrent.futures.Future):
                item = item.result()
            if item is None:
                continue  # deleted since the listing
            found[name] = item
            with self._lock:
                self.cache[name] = (key, *item, fingerprint(item[2]))
        seen = set(names)
        with self._lock:
            self.cache = {n: v for n, v in self.cache.items() if n in seen}
        segments: set[str] = set()
        if hide_segments:
            for name, (_info, _group, dlo) in found.items():
                if dlo is not None and dlo.container == self.container:
                    segments.update(n for n, _ in self.covered(every, names, dlo.prefix)
                                    if n != name)
        return [found[n] for n in names if n in found and n not in segments]

    def _head_for_listing(self, name: str
                          ) -> tuple[ImageInfo, str | None, Dlo | None] | None:
        try:
            info, group, _, dlo = self.head_full(name)
        except NotFound:
            return None
        return info, group, dlo

    # ------------------------------------------------------------------ DLO checks
    def dlo_manifests(self) -> dict[str, Dlo]:
        """Every DLO manifest of the container (name -> DLO), for the checks before a write,
        rename or delete: one listing, and a HEAD of the manifest alone only for entries not
        remembered by their listing key that list 0 bytes. A DLO manifest's own body is empty
        (Swift ignores it; Glance and the swift CLI write none), which the listing shows, so
        the images themselves are never HEADed here."""
        out: dict[str, Dlo] = {}
        for name, key in self.entries():
            with self._lock:
                hit = self.cache.get(name)
            if hit is not None and hit[0] == key:
                dlo = hit[3]
            elif key[2] in (0, "0"):
                try:
                    h = self.client.call(f"{name}: HEAD", "head_object", self.container, name,
                                         query_string="multipart-manifest=get")
                except NotFound:
                    continue
                dlo = dlo_of(h)
            else:
                continue
            if dlo is not None:
                out[name] = dlo
        return out

    def refuse_if_segment(self, name: str, what: str,
                          manifests: Mapping[str, Dlo] | None = None) -> None:
        """Busy (EBUSY) if ``name`` is, or would become, a segment of a DLO of the container:
        deleting, replacing or renaming it would change that image's bytes under Glance."""
        manifests = self.dlo_manifests() if manifests is None else manifests
        users = sorted(m for m, dlo in manifests.items()
                       if m != name and dlo.covers(self.container, name))
        if users:
            log.warning("store %s: refusing to %s %s: it is a segment of the large object%s "
                        "%s (X-Object-Manifest %s/%s)", self.client.store_id, what, name,
                        "s" if len(users) > 1 else "", ", ".join(users[:5]),
                        manifests[users[0]].container, manifests[users[0]].prefix)
            raise Busy(f"{self.client.store_id}/{name} is a segment of {', '.join(users[:5])}")
