"""Reading images: ranged GETs pinned to the version that was opened.

``version`` is the ETag HEAD returns: an object's md5, or for an SLO the md5 of its segments'
ETags (Swift's listing has the same value as ``slo_etag``). Ranged GETs send ``If-Match`` and
also check the response's ETag, and the reply itself by the one rule of ``ranges.py``. RGW
evaluates If-Match on an SLO against the manifest object itself, so a correct If-Match fails
with 412; on a 412 the reader HEADs, and if the image is in fact unchanged it stops sending
If-Match (logged once) and relies on the response ETag check, which is as atomic: headers and
body come from one version. SLOs imagefs wrote, and DLOs, are read from their segments instead
(the server resolves the manifest on every ranged GET of an SLO, which halves RGW's speed): see
``Reader.segment_map`` for why that pins the version just as strictly.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from imagefs.stores.base import BackendError, Changed, NotFound
from imagefs.stores.keylocks import KeyLocks
from imagefs.stores.ranges import check_reply
from imagefs.stores.swift.connection import Connections
from imagefs.stores.swift.layout import Dlo, SegmentMap, etag_of_segments
from imagefs.stores.swift.listing import Listing

log = logging.getLogger(__name__)


class Reader:
    """Ranged reads of one container's images, through their segment maps where possible."""

    #: Seconds a "no usable segment listing" answer for one of our SLOs is trusted.
    MAP_RETRY = 5.0

    def __init__(self, client: Connections, listing: Listing, segment_container: str) -> None:
        self.client = client
        self.listing = listing
        self.container = listing.container
        self.segment_container = segment_container
        self._lock = threading.Lock()
        self.if_match = True
        #: (name, version) -> (map or None, monotonic time it was built)
        self.segment_maps: dict[tuple[str, str], tuple[SegmentMap | None, float]] = {}
        #: one lock per (name, version) being mapped: unrelated images never wait for each other
        self._map_locks = KeyLocks(self._lock)

    @property
    def _id(self) -> str:
        return self.client.store_id

    def read_range(self, name: str, version: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        segments = self.segment_map(name, version)
        if segments is not None:
            return self._read_segments(name, segments, offset, length)
        return self._read_object(name, version, offset, length)

    # ------------------------------------------------------------------ segment maps
    def segment_map(self, name: str, version: str) -> SegmentMap | None:
        """Where the bytes of imagefs's SLO or of the DLO ``name`` at ``version`` lie, or None
        to read through the manifest (plain objects, foreign SLOs, a listing that does not add
        up).

        Ranged GETs of the segments themselves skip the server's manifest resolution on every
        read: RGW serves SLO ranges at half the speed of plain objects, Swift at two thirds.
        The pinning is as strict as If-Match on the manifest: the segment listing is accepted
        only if the md5 of its ETags is ``version`` (the SLO's ETag) and the sizes add up to
        the image's, each segment name holds a unique upload id (never overwritten), and every
        segment GET carries If-Match on that segment's ETag. Once a replaced image's segments
        are deleted, reads raise ``Changed``; until then they serve the old version, whole.

        A DLO (Glance's large images) is read the way Swift reads it, the objects under its
        manifest's prefix in name order, with the same check: its ETag (Swift's and RGW's
        alike) is the md5 of those objects' ETags. Its segment names are not unique, but a
        segment replaced fails its If-Match and one deleted its GET: ``Changed``, never a mix.
        (RGW refuses If-Match on ranged GETs of a DLO, so this is also its only pinned read.)
        """
        key = (name, version)
        hit = self._cached_map(key)
        if hit is not None:
            return hit[0]
        # One thread builds it while the prefetchers of the same image wait: on RGW a HEAD of an
        # SLO reads its segments' heads (0.2 s for 256 MiB), eight at once took 1.7 s each.
        timeout = self.client.timeout
        with self._map_locks.holding(key, timeout, lambda: BackendError(
                f"store {self._id}: {name}: segment map busy for {timeout:g}s")):
            hit = self._cached_map(key)
            if hit is not None:
                return hit[0]
            seen = self.listing.last_head(name)
            if seen is None or seen[0] != version:  # stat() before open() usually saw it
                try:
                    info, group, _, dlo = self.listing.head_full(name)
                except NotFound:  # deleted while open: EIO like any change, not ENOENT
                    raise Changed(f"{self._id}/{name} changed since it was opened") from None
                if info.version != version:
                    raise Changed(f"{self._id}/{name} changed since it was opened")
                seen = (info.version, info.size, group, dlo)
            smap = self.build_segment_map(name, version, size=seen[1], group=seen[2],
                                          dlo=seen[3])
            with self._lock:
                if len(self.segment_maps) >= 256:
                    self.segment_maps.pop(next(iter(self.segment_maps)))
                # a listing that did not add up may only lag: None is retried later
                retry = seen[2] is not None or seen[3] is not None
                self.segment_maps[key] = (smap, time.monotonic() if retry else float("inf"))
            return smap

    def _cached_map(self, key: tuple[str, str]) -> tuple[SegmentMap | None] | None:
        with self._lock:
            hit = self.segment_maps.get(key)
            if hit is None:
                return None
            smap, built = hit
            if smap is None and built != float("inf") and \
                    time.monotonic() - built > self.MAP_RETRY:
                del self.segment_maps[key]
                return None
            return (smap,)

    def build_segment_map(self, name: str, version: str, size: int, group: str | None,
                          dlo: Dlo | None = None) -> SegmentMap | None:
        """The segment map if the listing of ``group`` (our SLO) or of ``dlo``'s prefix adds
        up to ``version`` and ``size``. A DLO's empty segments count in its ETag only."""
        if group is not None:
            container, prefix = self.segment_container, group + "/"
        elif dlo is not None:
            container, prefix = dlo.container, dlo.prefix
        else:
            return None
        try:
            entries = [o for page in self.client.iter_container(container, prefix=prefix)
                       for o in page if o.get("name")]
        except NotFound:  # a DLO naming a container that is gone
            entries = []
        etags = [str(o.get("hash", "")).strip('"') for o in entries]
        sizes = [int(o.get("bytes", -1)) for o in entries]
        digest = etag_of_segments(etags)
        if group is None:  # DLO: its empty segments add no bytes
            keep = [i for i, n in enumerate(sizes) if n != 0]
            entries, etags, sizes = ([entries[i] for i in keep], [etags[i] for i in keep],
                                     [sizes[i] for i in keep])
        if not entries or digest != version or sum(sizes) != size or min(sizes) <= 0:
            log.debug("store %s: segments of %s do not add up to version %s; reading "
                      "through the manifest", self._id, name, version)
            return None
        starts = [0]
        for n in sizes[:-1]:
            starts.append(starts[-1] + n)
        return SegmentMap(starts, sizes, [o["name"] for o in entries], etags, container)

    # ------------------------------------------------------------------ GETs
    def _read_segments(self, name: str, smap: SegmentMap, offset: int, length: int) -> bytes:
        total = smap.starts[-1] + smap.sizes[-1]
        end = min(offset + length, total)
        parts: list[bytes] = []
        i = bisect.bisect_right(smap.starts, offset) - 1
        while offset < end:
            start, size = smap.starts[i], smap.sizes[i]
            n = min(end, start + size) - offset
            parts.append(self._get_range(smap.container, smap.names[i], smap.etags[i],
                                         offset - start, n, what=f"{name} (segment {i})",
                                         changed=f"{self._id}/{name}"))
            offset += n
            i += 1
        return b"".join(parts)

    def _get_range(self, container: str, obj: str, etag: str, offset: int, length: int,
                   what: str, changed: str) -> bytes:
        """Exactly ``length`` bytes at ``offset`` of an object that must have ``etag``;
        ``Changed`` (naming ``changed``) if it is gone or has another ETag."""
        what = f"{what}: GET {offset}+{length}"
        headers = {"Range": f"bytes={offset}-{offset + length - 1}", "If-Match": etag}
        resp: dict[str, Any] = {}
        try:
            h, body = self.client.invoke("get_object", container, obj, headers=headers,
                                         response_dict=resp)
        except self.client.ClientException as e:
            if getattr(e, "http_status", None) in (404, 412):
                raise Changed(f"{changed} changed since it was opened") from None
            raise self.client.error(e, what, False) from None
        except OSError as e:
            raise self.client.socket_error(what, e) from None
        got = h.get("etag", "").strip('"')
        if got != etag:
            raise Changed(f"{changed} changed since it was opened (ETag {got})")
        data = self._ranged_body(what, resp.get("status"), h, body, offset, length)
        if len(data) != length:
            raise BackendError(f"store {self._id}: {what}: got {len(data)} bytes")
        return data

    def _read_object(self, name: str, version: str, offset: int, length: int) -> bytes:
        """A ranged GET of the image object itself (plain object or manifest)."""
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        if self.if_match:
            headers["If-Match"] = version
        what = f"{name}: GET {offset}+{length}"
        resp: dict[str, Any] = {}
        try:
            h, body = self.client.invoke("get_object", self.container, name, headers=headers,
                                         response_dict=resp)
        except self.client.ClientException as e:
            status = getattr(e, "http_status", None)
            if status == 416:
                return b""  # at or past the end (an empty image answers 416 too)
            if status == 404:  # deleted while open: EIO like any change, not ENOENT
                raise Changed(f"{self._id}/{name} changed since it was opened") from None
            if status != 412 or "If-Match" not in headers:
                raise self.client.error(e, what, False) from None
            try:
                unchanged = self.listing.head(name, newest=True)[0].version == version
            except NotFound:
                unchanged = False
            if not unchanged:
                raise Changed(f"{self._id}/{name} changed since it was opened") from None
            log.info("store %s: the server refuses If-Match on unchanged large objects (RGW); "
                     "checking the ETag of each response instead", self._id)
            self.if_match = False
            return self._read_object(name, version, offset, length)
        except OSError as e:
            raise self.client.socket_error(what, e) from None
        got = h.get("etag", "").strip('"')
        if got != version:
            raise Changed(f"{self._id}/{name} changed since it was opened (ETag {got})")
        return self._ranged_body(what, resp.get("status"), h, body, offset, length)

    def _ranged_body(self, what: str, status: Any, h: Mapping[str, str], body: bytes,
                     offset: int, length: int) -> bytes:
        """The bytes asked for, by the rule of ``ranges.check_reply``: a 200 (the server
        ignored the range) only at offset 0, and only whole."""
        if status == 200 and len(body) != int(h.get("content-length", len(body))):
            raise BackendError(f"store {self._id}: {what}: short body")
        reply = check_reply(f"store {self._id}: {what}", status, h.get("content-range"),
                            len(body), offset, length)
        return body[:reply.length]
