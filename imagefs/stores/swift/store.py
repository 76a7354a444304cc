"""``SwiftStore``: the store interface over the package's parts.

The class holds the configuration and hands each operation to the part whose job it is:
``connection.Connections`` (requests, token, worker pool), ``listing.Listing`` (HEADs, the
listing, DLO checks), ``reading.Reader`` (ranged GETs), ``upload.SwiftUpload`` (writing and
publishing), ``journal.Journal`` (markers, segment deletion, leftovers), ``rename.Renamer``.
What stays here is the orchestration of delete and ``set_meta``, and the store's facts.
"""

from __future__ import annotations

import dataclasses
import logging
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from imagefs.options import OptionError, StoreConfig, option
from imagefs.stores.base import (
    BackendError,
    Changed,
    ImageInfo,
    NotFound,
    Store,
    Upload,
    check_name,
    glance_literal,
    meta_mode,
    meta_mtime,
    user_meta,
)
from imagefs.stores.budget import MemoryBudget
from imagefs.stores.owners import leftover_age_option, new_owner_id
from imagefs.stores.swift import auth
from imagefs.stores.swift.connection import Connections
from imagefs.stores.swift.journal import Journal
from imagefs.stores.swift.layout import (
    ETAG_META,
    OWN_META,
    SEGMENTS_META,
    SERVER_META,
    SIZE_META,
    etag_of_segments,
    is_slo,
    kept_headers,
    meta_headers,
    meta_of,
    safe_name,
)
from imagefs.stores.swift.listing import Listing
from imagefs.stores.swift.reading import Reader
from imagefs.stores.swift.rename import Renamer
from imagefs.stores.swift.segments import segment_target
from imagefs.stores.swift.upload import SwiftUpload

log = logging.getLogger(__name__)

MiB = 1 << 20


@dataclass(frozen=True)
class SwiftOptions:
    auth_url: str | None = option("str", help="auth URL; default $ST_AUTH (v1) or "
                                              "$OS_AUTH_URL (v3)")
    auth_version: str | None = option(("1", "3"),
                                      help='"1" (tempauth, RGW) or "3" (Keystone)')
    user: str | None = option("str", help="default $ST_USER or $OS_USERNAME")
    key_file: str | None = option("secret_file",
                                  help="file holding the key; default $ST_KEY or $OS_PASSWORD")
    project_name: str | None = option("str", help="Keystone v3 project")
    user_domain_name: str | None = option("str", help="Keystone v3 user domain")
    project_domain_name: str | None = option("str", help="Keystone v3 project domain")
    region_name: str | None = option("str", help="Keystone region of the endpoint")
    container: str = option("str", required=True, help="container of the images")
    segment_container: str | None = option(
        "str", help='SLO segments; default "<container>_segments"')
    segment_size: int = option("size", default=100 * MiB, help="SLO segment size")
    upload_concurrency: int = option("int", default=2, help="segment PUTs in flight per upload")
    upload_memory: int = option("size", default=64 * MiB,
                                help="buffers of all uploads of the store together")
    retries: int = option("int", default=3, help="retries of idempotent requests")
    leftover_age: float = leftover_age_option()
    cacert: str | None = option("path", help="CA bundle (PEM) to verify the server's TLS "
                                             "certificate; default the system's")
    insecure: bool = option("bool", default=False,
                            help="do not verify the server's TLS certificate")
    glance_reference: str | None = option("str", help="glance-swift.conf reference: locations "
                                                      "become swift+config://REF/container/name")


class SwiftStore(Store):
    type_name = "swift"
    Options = SwiftOptions
    opts: SwiftOptions
    default_concurrency = 8

    def __init__(self, cfg: StoreConfig) -> None:
        super().__init__(cfg)
        o = self.opts
        self.container: str = o.container
        self.segment_container: str = o.segment_container or f"{self.container}_segments"
        self.segment_size: int = o.segment_size
        self.upload_concurrency: int = o.upload_concurrency
        # Shared by every upload of this store, ``upload_memory`` in two halves. Small images
        # held whole until close (an idle writer may hold them for hours) only ever take what
        # is free, else stream as SLOs; queued chunks wait for room, which sends always free,
        # so small buffers can never starve a streaming upload.
        half = o.upload_memory // 2
        self.small_memory = MemoryBudget(half, f"store {self.id} (small images)")
        self.memory = MemoryBudget(o.upload_memory - half, f"store {self.id} (segment PUTs)")
        self.max_segments = 1000
        self.max_object = 5 << 30
        self._auth = auth.resolve(dataclasses.asdict(o))
        self.client = Connections(self.id, self._auth, retries=o.retries, timeout=self.timeout,
                                  cacert=o.cacert, insecure=o.insecure,
                                  concurrency=cfg.concurrency or self.default_concurrency)
        self.listing = Listing(self.client, self.container)
        self.reader = Reader(self.client, self.listing, self.segment_container)
        self.journal = Journal(self.client, self.listing, self.segment_container,
                               o.leftover_age)
        self.renamer = Renamer(self.client, self.listing, self.journal)

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        auth.check(options)
        container = options["container"]
        if not container or "/" in container:
            raise OptionError("container", "expected a container name without '/'")
        seg = options.get("segment_container")
        if seg is not None and (not seg or "/" in seg):
            raise OptionError("segment_container", "expected a container name without '/'")
        if (seg or f"{container}_segments") == container:
            raise OptionError("segment_container", "expected a container other than "
                                                   "`container`")
        if not MiB <= options["segment_size"] <= 5 << 30:
            raise OptionError("segment_size", 'expected a size from "1MiB" to "5GiB"')
        if not 1 <= options["upload_concurrency"] <= 32:
            raise OptionError("upload_concurrency", "expected an integer from 1 to 32")
        if not 0 <= options["retries"] <= 20:
            raise OptionError("retries", "expected an integer from 0 to 20")
        ref = options.get("glance_reference")
        if ref is not None and (not ref or "/" in ref or "@" in ref):
            raise OptionError("glance_reference", "expected a glance-swift.conf reference name")

    # ------------------------------------------------------------------ lifetime
    def open(self) -> None:
        self.client.open()
        try:
            self._container_ready(self.container)
            if not self.read_only:
                self._container_ready(self.segment_container)
        except BackendError:
            self.close()
            raise
        try:
            caps = self.client.invoke("get_capabilities")
            self.max_segments = int(caps.get("slo", {}).get("max_manifest_segments", 1000))
            self.max_object = int(caps.get("swift", {}).get("max_file_size", 5 << 30))
        except Exception as e:  # /info is optional: keep Swift's defaults
            log.debug("store %s: no /info (%s); assuming 1000 segments of at most 5GiB",
                      self.id, e)

    def _container_ready(self, container: str) -> None:
        try:
            self.client.call(f"container {container}: HEAD", "head_container", container)
        except NotFound:
            if self.read_only:
                raise BackendError(f"store {self.id}: container {container} does not exist "
                                   f"(the store is read-only, so it is not created)") from None
            self.client.call(f"container {container}: PUT", "put_container", container,
                             write=True)
            log.info("store %s: created container %s", self.id, container)

    def close(self) -> None:
        self.client.close()

    def cleanup_leftovers(self) -> int:
        if self.read_only:
            return 0
        return self.journal.cleanup_leftovers(self.renamer.finish)

    def segment_target(self, index: int) -> int:
        return segment_target(index, self.segment_size, self.max_segments, self.max_object)

    # ------------------------------------------------------------------ reading
    def list(self) -> Iterator[ImageInfo]:
        for info, _group, _dlo in self.listing.scan(hide_segments=True):
            yield info

    def stat(self, name: str) -> ImageInfo:
        check_name(name)
        return self.listing.head(name)[0]

    def read_range(self, name: str, version: str, offset: int, length: int) -> bytes:
        return self.reader.read_range(name, version, offset, length)

    # ------------------------------------------------------------------ changing
    def upload(self, name: str, size_hint: int | None = None) -> Upload:
        self._writable()
        check_name(name)
        self.listing.refuse_if_segment(name, "write")
        return SwiftUpload(self, name, size_hint)

    def rename(self, old: str, new: str) -> ImageInfo:
        """See ``rename.Renamer.rename``."""
        self._writable()
        check_name(old)
        check_name(new)
        return self.renamer.rename(old, new)

    def delete(self, name: str) -> None:
        """Plain objects: one DELETE. SLOs: the manifest and its segment group (kept if another
        manifest uses it). DLOs: the manifest, then its segments (those in this container that
        no other manifest covers). A segment of a DLO is refused (Busy)."""
        self._writable()
        check_name(name)
        info, group, slo, dlo = self.listing.head_full(name, newest=True)
        self.listing.refuse_if_segment(name, "delete")
        if dlo is not None:
            self.client.call(f"{name}: DELETE (large object manifest)", "delete_object",
                             self.container, name, write=True)
            self.listing.forget(name)
            self.journal.drop_dlo_segments(dlo, exclude=name)
            return
        if not slo:
            self.client.call(f"{name}: DELETE", "delete_object", self.container, name,
                             write=True)
            self.listing.forget(name)
            return
        if group is None:  # a foreign SLO: the server deletes its segments
            self._multipart_delete(name, info.version)
            self.listing.forget(name)
            return
        uid = new_owner_id()
        self.journal.put_marker(uid, {"op": "delete", "image": name, "groups": [group]})
        try:
            shared = self.journal.referenced(group, exclude=name)
        except BaseException:
            self.journal.drop_marker(uid)
            raise
        if shared:  # a copy uses the segments too: delete this manifest only
            try:
                self.client.call(f"{name}: DELETE", "delete_object", self.container, name,
                                 write=True)
            except NotFound:
                pass
            finally:
                self.journal.drop_marker(uid)
            self.listing.forget(name)
            return
        self._multipart_delete(name, info.version)
        self.listing.forget(name)
        self.journal.drop_group(group, uid, exclude=name)  # what the server's SLO delete missed

    def _multipart_delete(self, name: str, version: str) -> None:
        """DELETE ?multipart-manifest=delete: the manifest and its segments, server-side.

        Servers answer 2xx even when part of it failed (the body, which swiftclient drops,
        lists what): the caller sweeps our segment group afterwards, and a HEAD here makes
        sure the manifest itself is gone (a different version there is someone else's image).
        """
        self.client.call(f"{name}: DELETE (SLO)", "delete_object", self.container, name,
                         query_string="multipart-manifest=delete", write=True)
        try:
            still = self.listing.head(name, newest=True)[0].version == version
        except NotFound:
            return
        if still:
            raise BackendError(f"store {self.id}: {name}: the SLO delete left the manifest")

    def set_meta(self, name: str, meta: Mapping[str, str], expect: str | None = None
                 ) -> ImageInfo:
        """POST replaces all user metadata: merge with what HEAD says first.

        The POST is unconditional, so a full HEAD afterwards checks the real ETag and size
        against what was written; if the image was replaced in between, its own size, ETag
        and segment group (found by the listing of its segment prefix) are POSTed back. Known
        limit: on RGW, a plain image replaced by an SLO in that window loses RGW's SLO flag
        (it is user metadata there, and the POST could not know to keep it)."""
        self._writable()
        check_name(name)
        h, (info, _, _) = self.listing.head_headers(name, newest=True)
        if expect is not None and info.version != expect:
            raise Changed(f"{self.id}/{name} is no longer version {expect}")
        asked = {k: v for k, v in user_meta(meta).items() if not k.startswith("imagefs_")}
        merged = {**meta_of(h, keep_server=True), **asked}
        self._post(name, merged, h)
        # The POST is unconditional: if the image was replaced since the HEAD, it just gave the
        # new image the old one's size, ETag and segments. A full HEAD tells the real ones.
        h2 = self.client.call(f"{name}: HEAD", "head_object", self.container, name,
                              headers={"X-Newest": "true"})
        real = self.listing.info(name, h2)
        assert real is not None
        want_etag = merged.get(ETAG_META) if merged.get(SEGMENTS_META) else info.version
        want_size = merged.get(SIZE_META) if merged.get(SEGMENTS_META) else str(info.size)
        if real[0].version != want_etag or str(real[0].size) != want_size:
            log.info("store %s: %s was replaced during set_meta: its own size and segments "
                     "are written back", self.id, name)
            own = self._own_meta(name, real[0], h2)
            merged = {**own, **asked} if expect is None else own
            self._post(name, merged, h2, forget=False)
            if expect is not None:
                raise Changed(f"{self.id}/{name} was replaced while its metadata was set")
            info = real[0]
        visible = {k: v for k, v in merged.items() if k not in OWN_META + tuple(SERVER_META)}
        return ImageInfo(name=name, size=info.size, mtime=meta_mtime(visible, info.mtime),
                         mode=meta_mode(visible), version=info.version, meta=visible)

    def _post(self, name: str, meta: Mapping[str, str], headers: Mapping[str, str],
              forget: bool = True) -> None:
        self.client.call(f"{name}: POST", "post_object", self.container, name,
                         headers={**meta_headers(meta), **kept_headers(headers)}, write=True)
        if forget:
            self.listing.forget(name)

    def _own_meta(self, name: str, real: ImageInfo, headers: Mapping[str, str]
                  ) -> dict[str, str]:
        """The metadata imagefs keeps on the object now called ``name`` (``real``: a full HEAD
        of it): for one of our SLOs its segment group — the group under the image's segment
        prefix whose listing adds up to its ETag and size — with the server's SLO flag."""
        if not is_slo(headers):
            return {}
        groups: dict[str, list[dict[str, Any]]] = {}
        for page in self.client.iter_container(self.segment_container,
                                               prefix=safe_name(name) + "/"):
            for o in page:
                groups.setdefault(str(o.get("name", "")).rsplit("/", 1)[0], []).append(o)
        own = {k: v for k, v in meta_of(headers, keep_server=True).items() if k in SERVER_META}
        for group, entries in groups.items():
            digest = etag_of_segments(str(o.get("hash", "")).strip('"') for o in entries)
            if digest == real.version and \
                    sum(int(o.get("bytes", 0)) for o in entries) == real.size:
                return {**own, SEGMENTS_META: group, SIZE_META: str(real.size),
                        ETAG_META: real.version}
        return own

    # ------------------------------------------------------------------ facts
    def location(self, name: str) -> str:
        """Glance's swift location without credentials.

        With ``glance_reference``: ``swift+config://REF/container/name`` (Glance's single-tenant
        form, credentials in glance-swift.conf). Otherwise Glance's multi-tenant form, the
        storage URL itself: ``swift+http://host:port/v1/AUTH_acct/container/name``, which a
        single-tenant Glance cannot use (it would take the storage URL for its auth URL) and
        which has no credentials-free single-tenant equivalent: set ``glance_reference``.
        Container and name are written verbatim, as glance_store reads them (no decoding).
        """
        obj = glance_literal(name, "image name")
        container = glance_literal(self.container, "container")
        ref = self.opts.glance_reference
        if ref:
            return f"swift+config://{ref}/{container}/{obj}"
        if self.client.url is None:
            raise BackendError(f"store {self.id}: not connected")
        u = urllib.parse.urlsplit(self.client.url)
        return f"swift+{u.scheme}://{u.netloc}{u.path.rstrip('/')}/{container}/{obj}"

    def usage(self) -> tuple[int, int] | None:
        main = self.client.call(f"container {self.container}: HEAD", "head_container",
                                self.container)
        try:
            seg = self.client.call(f"container {self.segment_container}: HEAD",
                                   "head_container", self.segment_container)
        except NotFound:
            seg = {}
        images = int(main.get("x-container-object-count", 0))
        main_bytes = int(main.get("x-container-bytes-used", 0))
        seg_bytes = int(seg.get("x-container-bytes-used", 0))
        # Swift counts an SLO manifest at its total size (listing override); RGW at the
        # manifest's own few bytes: only then do the segments add to the images' bytes.
        return images, main_bytes if main_bytes >= seg_bytes else main_bytes + seg_bytes

    def properties(self) -> dict[str, str]:
        a = self._auth
        props = {"auth_url": str(a.auth_url), "auth_version": a.auth_version,
                 "user": str(a.user), "container": self.container,
                 "segment_container": self.segment_container}
        if self.client.url:
            props["storage_url"] = self.client.url
        return props
