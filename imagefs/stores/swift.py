"""``type = "swift"``: images are objects in one OpenStack Swift container (or RGW's Swift API).

Layout
    An image is a plain object (small images: one PUT at commit) or a Static Large Object whose
    segments live in ``segment_container`` (default ``<container>_segments``) under
    ``<name>/<upload-id>/<NNNNNNNN>``; ``<name>`` is the image name with every character outside
    ``[A-Za-z0-9._-]`` replaced by ``_`` (RGW URL-decodes segment paths in SLO deletes, so a '%'
    in a segment name would orphan it) and an ``x`` in front of a leading ``_`` (RGW does not
    find SLO segments named ``_...``); the upload id is an owner id from ``owners.py``
    (``<host>_<pid>_<starttime>_<random>``).
    The manifest records its segment group (``<name>/<upload-id>``) in
    ``X-Object-Meta-Imagefs-Segments``, and the SLO's size and ETag in ``-Imagefs-Size`` and
    ``-Imagefs-Etag``; copies (rename) keep them, so every imagefs operation can find an image's
    segments without reading the manifest (RGW cannot return SLO manifests) and a HEAD of the
    manifest alone describes the image (see ``_head_headers``). mtime, mode and Glance's hashes
    are ``X-Object-Meta-*`` headers.

Uploads
    Writes arrive in order (no ``random_write``: ``writer.py`` spools otherwise). The first
    ``min(segment_size, 16 MiB)`` are buffered; an image that ends there is one plain PUT at
    commit. Past that, each segment is one chunked PUT fed through a small bounded queue while the
    writer goes on, so memory per upload stays at a few chunks whatever ``segment_size`` is; up to
    ``upload_concurrency`` segment PUTs are in flight. Buffered and queued bytes of all uploads
    of the store together stay within ``upload_memory`` (``budget.py``; half for small images,
    half for queued chunks): a small image that does not fit streams as an SLO, and a chunk
    waits for others to be sent. A segment whose writer
    stalls is closed early (the next bytes start a new segment) so the proxy never times the
    PUT out. Segment PUTs
    are chunked requests made with ``http.client``: the body is that queue, every socket call is
    bounded by the store timeout (a dead proxy ends in an error, never a hang) and the returned
    ETag must be the md5 of the bytes sent (with ``cacert``/``insecure`` applied to TLS, as for
    swiftclient). The SLO manifest is PUT at commit: the only moment the image appears; its
    answer must carry the SLO ETag computed here, and a full HEAD (not our metadata) then checks
    the real ETag, size and segment group. A manifest PUT that fails other than by a clean 4xx
    may still have been stored: a HEAD decides (our group there: published); if it cannot, the
    segments and markers stay for ``cleanup_leftovers``. One lock per upload serialises write,
    the start of commit and abort (the bridge abandons calls that overrun, so an old write may
    still run); an abort during commit deletes nothing: commit owns that outcome.

Leftovers
    Before an operation can orphan segments (an upload's first segment, replacing or deleting an
    SLO) it writes a marker ``.imagefs-pending/<upload-id>`` in the segment container, naming the
    image and the segment groups at stake; it is removed when the operation ends, but only once
    its groups are really gone (every DELETE worked, a new listing is empty) and no segment PUT
    still runs. At mount, a marker whose writer is gone (same host and its pid/start time no
    longer runs, or another host and older than ``leftover_age``) has its groups deleted unless
    a manifest references them.

Renames and shared groups
    A rename copies the manifest, so until the old name's DELETE two manifests share a segment
    group. A marker (``op = "rename"``) is written before the copy: the next mount finishes a
    rename cut short by a crash (plain DELETE of the source); any other failure after the copy
    removes the copy with a plain DELETE (never ``multipart-manifest=delete``). Before a delete or
    replace deletes a group, every manifest is checked: a group another manifest references is
    kept and only the manifest goes.

Metadata
    ``set_meta`` merges with a HEAD and POSTs (a POST replaces all user metadata). The POST is
    unconditional, so a full HEAD afterwards checks the real ETag and size against what was
    written; if the image was replaced in between, its own size, ETag and segment group (found
    by the listing of its segment prefix) are POSTed back. Known limit: on RGW, a plain image
    replaced by an SLO in that window loses RGW's SLO flag (it is user metadata there, and the
    POST could not know to keep it).

Versions and reads
    ``version`` is the ETag HEAD returns: an object's md5, or for an SLO the md5 of its segments'
    ETags (Swift's listing has the same value as ``slo_etag``). Ranged GETs send ``If-Match`` and
    also check the response's ETag, Content-Range and length. RGW evaluates If-Match on an SLO
    against the manifest object itself, so a correct If-Match fails with 412; on a 412 the store
    HEADs, and if the image is in fact unchanged it stops sending If-Match (logged once) and
    relies on the response ETag check, which is as atomic: headers and body come from one version.
    SLOs imagefs wrote are read from their segments instead (the server resolves the manifest
    on every ranged GET of an SLO, which halves RGW's speed): see ``_segment_map`` for why that
    pins the version just as strictly.

Listing
    A container listing has no user metadata (and on RGW no SLO sizes), so ``list()`` HEADs each
    entry, in parallel, and remembers the result keyed by the listing's (hash, last_modified,
    bytes). A metadata POST changes ``last_modified`` in the listing (Swift and RGW both), so the
    key is an exact change detector: after the first listing only changed entries cost a HEAD.

Dynamic Large Objects (Glance's large images)
    glance_store's Swift driver writes an image above ``swift_store_large_object_size`` as a
    DLO: segments ``<id>-00001``... in the same container and a 0-byte manifest whose
    ``X-Object-Manifest: <container>/<prefix>`` makes the image the concatenation, in name order,
    of the objects under that prefix. Size and version (the md5 of the segments' ETags, on Swift
    and RGW alike) come from a full HEAD; reads go to the segments, pinned as an SLO's are (see
    ``_segment_map``). Listings leave out the objects a listed DLO of the container uses, and a
    remembered DLO is HEADed again when its segments' listing keys change. Deleting, writing
    or renaming (from or onto) a name under a DLO's prefix is refused (``Busy``): it would change
    that image. Deleting a DLO deletes its manifest, then its segments; replacing one (upload or
    rename onto its name) deletes them after the publish; segments another manifest covers too
    are kept, and so are segments in other containers. metadata POSTs re-send the manifest
    header (Swift drops it otherwise). The checks find manifests among the 0-byte entries of
    a listing (a manifest's own body is empty: Swift ignores it, Glance and the swift CLI write
    none), so they cost one listing and HEADs only of 0-byte objects not seen before.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import datetime
import email.utils
import hashlib
import http.client
import json
import logging
import os
import queue
import re
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from imagefs.options import Option, StoreConfig
from imagefs.stores.base import (
    HIDDEN_PREFIX,
    BackendError,
    Busy,
    Changed,
    ImageInfo,
    InvalidName,
    NoSpace,
    NotFound,
    OptionError,
    ReadOnly,
    Store,
    StoreError,
    Upload,
    check_name,
    glance_literal,
    is_hidden,
    meta_mode,
    meta_mtime,
    user_meta,
)
from imagefs.stores.budget import MemoryBudget
from imagefs.stores.owners import new_owner_id, owner_state

log = logging.getLogger(__name__)

MiB = 1 << 20
#: Marker objects in the segment container: ``.imagefs-pending/<upload-id>``.
PENDING_PREFIX = HIDDEN_PREFIX + "pending/"
#: The manifest header naming its segment group (``<safe name>/<upload-id>``).
SEGMENTS_META = "imagefs_segments"
#: The SLO's size and ETag as its manifest PUT made them: what a HEAD of the manifest alone
#: (``?multipart-manifest=get``) needs to describe the image (see ``_head_headers``).
SIZE_META = "imagefs_size"
ETAG_META = "imagefs_etag"
_OWN_META = (SEGMENTS_META, SIZE_META, ETAG_META)
_META = "x-object-meta-"
#: Largest image kept in memory and sent as one plain PUT.
SMALL_LIMIT = 16 * MiB
#: Chunks waiting per segment PUT (each at most what one write() passed, 4 MiB from writer.py).
QUEUE_DEPTH = 4
LIST_PAGE = 1000
_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_END = object()
_ABORT = object()


def _env(*names: str) -> str | None:
    for n in names:
        v = os.environ.get(n)
        if v:
            return v
    return None


def _auth_version(options: Mapping[str, Any]) -> str:
    """Config, else the environment as the swift CLI reads it, else "1"."""
    v = options.get("auth_version") or _env("ST_AUTH_VERSION", "OS_AUTH_VERSION",
                                            "OS_IDENTITY_API_VERSION")
    if v is None:
        v = "3" if _env("OS_AUTH_URL") and not _env("ST_AUTH") else "1"
    return {"1.0": "1", "3.0": "3", "v3": "3"}.get(v, v)


def _resolved(options: Mapping[str, Any]) -> dict[str, Any]:
    """Auth settings with the OS_* / ST_* environment filling what the config leaves out."""
    v = _auth_version(options)
    v1 = v == "1"
    return {
        "auth_version": v,
        "auth_url": options.get("auth_url") or (_env("ST_AUTH", "OS_AUTH_URL") if v1
                                                else _env("OS_AUTH_URL", "ST_AUTH")),
        "user": options.get("user") or (_env("ST_USER", "OS_USERNAME") if v1
                                        else _env("OS_USERNAME", "ST_USER")),
        "key_file": options.get("key_file"),
        "key_env": _env("ST_KEY", "OS_PASSWORD") if v1 else _env("OS_PASSWORD", "ST_KEY"),
        "project_name": options.get("project_name") or _env("OS_PROJECT_NAME",
                                                            "OS_TENANT_NAME"),
        "user_domain_name": options.get("user_domain_name") or _env("OS_USER_DOMAIN_NAME"),
        "project_domain_name": (options.get("project_domain_name")
                                or _env("OS_PROJECT_DOMAIN_NAME")),
        "region_name": options.get("region_name") or _env("OS_REGION_NAME"),
    }


def _safe_name(name: str) -> str:
    """The image's part of its segment names: ASCII only, never starting with '_'.

    RGW (16.2) cannot resolve SLO segments whose name starts with '_' (it escapes such names
    in its bucket index): the manifest PUT succeeds, then every HEAD/GET of the image is 404.
    """
    safe = _UNSAFE.sub("_", name)[:64]
    return safe if safe and not safe.startswith("_") else "x" + safe


def _http_date(value: str | None) -> float:
    if not value:
        return 0.0
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return 0.0


def _meta_headers(meta: Mapping[str, str]) -> dict[str, str]:
    """``os_hash_algo`` → ``X-Object-Meta-Os-Hash-Algo`` (servers turn '_' into '-' anyway)."""
    return {"X-Object-Meta-" + k.replace("_", "-"): v for k, v in meta.items()}


#: User-metadata names servers use themselves (RGW shows its SLO flag as one).
_SERVER_META = frozenset({"static_large_object"})


def _kept_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """What a metadata POST must send back besides user metadata so the object stays what it
    is: a DLO's ``X-Object-Manifest`` (Glance's large images). Swift drops it on a POST
    without it, which leaves a 0-byte object and orphans the segments."""
    manifest = headers.get("x-object-manifest")
    return {"X-Object-Manifest": manifest} if manifest else {}


@dataclass(frozen=True)
class _Dlo:
    """A Dynamic Large Object's manifest: the image is the concatenation, in name order, of
    the objects of ``container`` whose names start with ``prefix``."""

    container: str
    prefix: str

    def covers(self, container: str, name: str) -> bool:
        return container == self.container and name.startswith(self.prefix)


def _dlo_of(headers: Mapping[str, str]) -> _Dlo | None:
    """The DLO a HEAD describes, from ``X-Object-Manifest: <container>/<prefix>`` (URL-decoded,
    as Swift's dlo middleware reads it), or None for anything else."""
    value = headers.get("x-object-manifest")
    if not value or "/" not in value:
        return None
    container, prefix = urllib.parse.unquote(value).split("/", 1)
    return _Dlo(container, prefix) if container else None


def _meta_of(headers: Mapping[str, str], keep_server: bool = False) -> dict[str, str]:
    """User metadata from headers; ``keep_server`` keeps the server's own flags, which a POST
    (it replaces all user metadata) must send back: RGW forgets an SLO flag left out."""
    meta = {k[len(_META):].replace("-", "_"): v for k, v in headers.items()
            if k.startswith(_META)}
    return {k: v for k, v in meta.items() if keep_server or k not in _SERVER_META}


@dataclass(frozen=True)
class _SegmentMap:
    """The segments of one SLO or DLO version, in order: where each starts, its size, name,
    ETag, and the container holding them."""

    starts: list[int]
    sizes: list[int]
    names: list[str]
    etags: list[str]
    container: str


class _Segment:
    """One segment PUT, fed by the writer through a bounded queue, sent by a pool thread."""

    def __init__(self, index: int, obj: str, target: int, budget: MemoryBudget) -> None:
        self.index = index
        #: Every chunk in ``q`` holds its length from here until it is sent or drained.
        self.budget = budget
        self.obj = obj
        self.target = target  # bytes this segment takes before the next one starts
        self.fed = 0  # bytes handed to the queue
        self.sent = 0  # bytes the PUT has sent
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.q: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_DEPTH)
        self.lock = threading.Lock()
        self.closed = False  # no more bytes go into this segment
        self.aborted = False
        self.etag = ""
        self.future: concurrent.futures.Future[None] | None = None

    def chunks(self, idle: float) -> Iterator[Any]:
        """The PUT body. Ends at _END, or early when the writer pauses for ``idle`` seconds."""
        while True:
            try:
                item = self.q.get(timeout=idle)
            except queue.Empty:
                with self.lock:
                    if self.q.empty():
                        self.closed = True  # the writer starts a new segment for what follows
                        return
                continue
            if item is _END:
                return
            if item is _ABORT or self.aborted:
                if item is not _ABORT:
                    self.budget.give(len(item))
                raise BackendError("segment upload aborted")
            self.md5.update(item)
            self.sent += len(item)
            try:
                yield item
            finally:
                self.budget.give(len(item))

    def drain(self) -> None:
        """No PUT will send what is queued (it ended, or never started): close the segment
        and give the queued chunks' memory back."""
        with self.lock:
            self.closed = True
            while True:
                try:
                    item = self.q.get_nowait()
                except queue.Empty:
                    return
                if isinstance(item, memoryview):
                    self.budget.give(len(item))


class SwiftUpload(Upload):
    """One upload. ``lock`` serialises write, commit's start and abort (the bridge abandons a
    call that overruns its deadline, so an old write may still run when abort or commit comes);
    ``state`` goes open → committing → published | failed, or open → aborted."""

    def __init__(self, store: SwiftStore, name: str, size_hint: int | None) -> None:
        self.store = store
        self.name = name
        self.uid = new_owner_id()
        self.group = f"{_safe_name(name)}/{self.uid}"
        self.size = 0
        self.small: list[bytes] | None = []
        self.small_held = 0  # bytes of ``small`` taken from the store's memory budget
        self.small_limit = min(store.segment_size, SMALL_LIMIT)
        self.segments: list[_Segment] = []
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.marker = False
        self.lock = threading.Lock()
        self.state = "open"
        self.dead = False  # abort asked: writes stop at their next chunk
        self.published = False
        #: the manifest PUT failed without a clear answer: it may yet be visible, so segments
        #: and markers stay for ``cleanup_leftovers`` (which keeps groups a manifest references)
        self.unknown = False
        self.error: BaseException | None = None
        if size_hint is not None and size_hint > self.small_limit:
            self._start_streaming()

    @property
    def finished(self) -> bool:
        return self.state != "open"

    def _what(self) -> str:
        return f"{self.store.id}/{self.name}"

    def _acquire(self) -> None:
        if not self.lock.acquire(timeout=self.store.timeout):
            raise BackendError(f"{self._what()}: upload busy for {self.store.timeout:g}s",
                               retryable=True)

    # ------------------------------------------------------------------ writing
    def write(self, offset: int, data: bytes) -> None:
        if self.finished or self.dead:
            raise BackendError(f"{self._what()}: upload already finished")
        self._acquire()
        try:
            if self.finished or self.dead:
                raise BackendError(f"{self._what()}: upload already finished")
            if offset != self.size:
                raise BackendError(f"{self._what()}: write at {offset}, expected {self.size} "
                                   f"(swift uploads are sequential)")
            if not data:
                return
            self._check_failed()
            if self.small is not None:
                if (self.size + len(data) <= self.small_limit
                        and self.store.small_memory.try_take(len(data))):
                    self.small_held += len(data)
                    self.small.append(bytes(data))
                    self.size += len(data)
                    return
                self._start_streaming()
            self._feed(memoryview(data))
            self.size += len(data)
        finally:
            self.lock.release()

    def _start_streaming(self) -> None:
        """Write the pending marker, then move the buffered bytes into the first segment."""
        self.store._put_marker(self.uid, {"op": "upload", "image": self.name,
                                          "groups": [self.group]})
        self.marker = True
        buffered, self.small = self.small or [], None
        self._give_small()
        self.pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.store.upload_concurrency,
            thread_name_prefix=f"swift-up-{self.store.id}")
        for chunk in buffered:
            self._feed(memoryview(chunk))

    def _check_failed(self) -> None:
        if self.dead:
            raise BackendError(f"{self._what()}: upload aborted")
        if self.error is not None:
            raise BackendError(f"{self._what()}: segment upload failed: {self.error}")
        for seg in self.segments:
            f = seg.future
            if f is not None and f.done() and not f.cancelled() and f.exception() is not None:
                self.error = f.exception()
                raise BackendError(f"{self._what()}: segment {seg.index} upload failed: "
                                   f"{self.error}")

    def _new_segment(self) -> _Segment:
        """A new segment and its PUT (called under ``lock``: abort never sees half of it)."""
        if self.dead:
            raise BackendError(f"{self._what()}: upload aborted")
        index = len(self.segments)
        if index >= self.store.max_segments:
            raise NoSpace(f"{self._what()}: more than {self.store.max_segments} segments "
                          f"(the server's limit); raise segment_size")
        seg = _Segment(index, f"{self.group}/{index:08d}", self.store._segment_target(index),
                       self.store.memory)
        assert self.pool is not None
        self.segments.append(seg)
        seg.future = self.pool.submit(self.store._send_segment, seg)
        return seg

    def _feed(self, view: memoryview) -> None:
        while view:
            seg = self.segments[-1] if self.segments else None
            if seg is None or seg.fed >= seg.target or seg.closed:
                if seg is not None:
                    self._put(seg, _END)
                seg = self._new_segment()
            n = min(len(view), seg.target - seg.fed)
            if not self._put(seg, view[:n]):
                continue  # the segment was closed while idle: the bytes go to the next one
            seg.fed += n
            view = view[n:]

    def _put(self, seg: _Segment, item: Any) -> bool:
        """Queue ``item`` for ``seg``; False if the segment closed itself first (idle).

        A chunk takes its length from the store's memory budget first (waiting, within the
        store timeout, for other uploads' chunks to be sent); the segment gives it back."""
        deadline = time.monotonic() + self.store.timeout
        held = len(item) if isinstance(item, memoryview) else 0
        if held:
            self.store.memory.take(held, self.store.timeout)
        try:
            return self._put_held(seg, item, deadline)
        except BaseException:
            self.store.memory.give(held)
            raise

    def _put_held(self, seg: _Segment, item: Any, deadline: float) -> bool:
        while True:
            if self.dead:
                raise BackendError(f"{self._what()}: upload aborted")
            with seg.lock:
                if seg.closed:
                    if isinstance(item, memoryview):
                        self.store.memory.give(len(item))
                    return False
                try:
                    seg.q.put_nowait(item)
                    if item is _END:
                        seg.closed = True
                    return True
                except queue.Full:
                    pass
            f = seg.future
            if f is not None and f.done():
                self._check_failed()
                raise BackendError(f"{self._what()}: segment {seg.index} upload ended early")
            if time.monotonic() > deadline:
                raise BackendError(f"{self._what()}: segment {seg.index} upload made no "
                                   f"progress for {self.store.timeout:g}s", retryable=True)
            time.sleep(0.005)

    def _finish_segments(self) -> None:
        if self.segments:
            self._put(self.segments[-1], _END)
        for seg in self.segments:
            assert seg.future is not None
            try:
                seg.future.result(timeout=self.store.timeout)
            except concurrent.futures.TimeoutError:
                raise BackendError(f"{self._what()}: segment {seg.index} upload did not finish "
                                   f"within {self.store.timeout:g}s", retryable=True) from None
            except StoreError:
                raise
            except Exception as e:
                raise BackendError(f"{self._what()}: segment {seg.index}: {e}") from None
        sent = sum(s.sent for s in self.segments)
        if sent != self.size:
            raise BackendError(f"{self._what()}: segments hold {sent} bytes, wrote {self.size}")

    # ------------------------------------------------------------------ publishing
    def commit(self, meta: Mapping[str, str]) -> ImageInfo:
        self._acquire()
        try:
            if self.finished or self.dead:
                raise BackendError(f"{self._what()}: upload already finished")
            self.state = "committing"
        finally:
            self.lock.release()
        st = self.store
        headers = _meta_headers({k: v for k, v in user_meta(meta).items()
                                 if not k.startswith("imagefs_")})
        old_group: str | None = None
        old_dlo: _Dlo | None = None
        replace_uid: str | None = None
        try:
            self._check_failed()
            old_group, old_dlo = st._group_of_existing(self.name)
            if old_group is not None and old_group != self.group:
                replace_uid = new_owner_id()
                st._put_marker(replace_uid, {"op": "replace", "image": self.name,
                                             "groups": [old_group]})
            if self.small is not None:
                info = self._commit_plain(headers)
            else:
                info = self._commit_slo(headers)
        except BaseException:
            if self.published:
                self._after_publish(old_group, replace_uid, old_dlo)
            else:
                self.state = "failed"
                if self.unknown:  # it may be visible yet: cleanup_leftovers decides
                    log.warning("%s: the outcome of publishing is unknown; segments and markers "
                                "stay for the clean-up at the next mount", self._what())
                    if self.pool is not None:
                        self.pool.shutdown(wait=False)
                else:
                    self._discard_in_background(replace_uid)
            raise
        self._after_publish(old_group, replace_uid, old_dlo)
        return info

    def _discard_in_background(self, replace_uid: str | None) -> None:
        """A failed commit reports at once; deleting what it left runs in a thread of its
        own. Done inline, a stalled proxy held the writer's close() for the segment PUTs'
        wait, the segment listing and every DELETE, each with its retries (19 s at
        timeout = 3); what the thread cannot delete, the next mount does."""
        st = self.store

        def clean_up() -> None:
            try:
                self._discard()
                if replace_uid is not None:  # nothing was replaced after all
                    st._delete_quietly(st.segment_container, PENDING_PREFIX + replace_uid)
            except Exception as e:
                log.warning("%s: clean-up after a failed commit: %s (the next mount "
                            "finishes it)", self._what(), e)

        self.dead = True
        threading.Thread(target=clean_up, name=f"swift-discard-{st.id}", daemon=True).start()

    def _after_publish(self, old_group: str | None, replace_uid: str | None,
                       old_dlo: _Dlo | None = None) -> None:
        """The image is published: drop the markers and the replaced image's segments (an
        SLO's group, or a replaced DLO's segments, which would otherwise show as images)."""
        self.state = "published"
        st = self.store
        st._forget(self.name)
        if self.pool is not None:
            self.pool.shutdown(wait=False)
        try:
            if self.marker:
                st._delete_quietly(st.segment_container, PENDING_PREFIX + self.uid)
            if replace_uid is not None and old_group is not None:
                st._drop_group(old_group, replace_uid, exclude=self.name)
            if old_dlo is not None:
                st._drop_dlo_segments(old_dlo, exclude=self.name)
        except StoreError as e:  # the next mount's clean-up finishes the job
            log.warning("%s: clean-up after publishing: %s", self._what(), e)

    def _unclear(self, err: StoreError) -> None:
        """The manifest (or object) PUT failed without a clean refusal: the server may have
        stored it anyway. Published if the name now holds our segment group; otherwise the
        outcome is unknown and ``err`` is raised."""
        if self.small is None:
            try:
                if self.store._head(self.name, newest=True)[1] == self.group:
                    log.info("%s: %s, but the manifest is there: published", self._what(), err)
                    self.published = True
                    return
            except StoreError:
                pass
        self.unknown = True
        raise err

    def _put_image(self, what: str, *args: Any, **kwargs: Any) -> Any:
        """The PUT that publishes: a clean 4xx raises; other errors go to ``_unclear``."""
        st = self.store
        if self.dead:
            raise BackendError(f"{self._what()}: upload aborted")
        try:
            return st._call(what, "put_object", st.container, self.name, *args, write=True,
                            **kwargs)
        except StoreError as e:
            status = getattr(e, "status", None)
            if status is not None and 400 <= status < 500:  # a clean refusal: not stored
                if isinstance(e, NotFound):  # RGW: a segment is missing. Not ENOENT.
                    raise BackendError(f"{e} (a segment is missing)") from None
                raise
            self._unclear(e)
        return None

    def _give_small(self) -> None:
        self.store.small_memory.give(self.small_held)
        self.small_held = 0

    def _commit_plain(self, headers: dict[str, str]) -> ImageInfo:
        body = b"".join(self.small or [])
        self.small = None  # ``body`` is now the only copy
        self._give_small()
        etag = hashlib.md5(body, usedforsecurity=False).hexdigest()
        got = self._put_image(f"{self.name}: PUT", body, content_length=len(body), etag=etag,
                              content_type="application/octet-stream", headers=headers)
        self.published = True
        if got and got.strip('"') != etag:
            raise BackendError(f"{self._what()}: PUT returned ETag {got}, expected {etag}")
        return self._verify(etag, len(body), slo=False)

    def _commit_slo(self, headers: dict[str, str]) -> ImageInfo:
        st = self.store
        self._finish_segments()
        manifest = [{"path": f"/{st.segment_container}/{s.obj}", "etag": s.etag,
                     "size_bytes": s.sent} for s in self.segments]
        slo_etag = hashlib.md5("".join(s.etag for s in self.segments).encode(),
                               usedforsecurity=False).hexdigest()
        headers = {**headers, "X-Object-Meta-Imagefs-Segments": self.group,
                   "X-Object-Meta-Imagefs-Size": str(self.size),
                   "X-Object-Meta-Imagefs-Etag": slo_etag}
        got = self._put_image(f"{self.name}: PUT manifest", json.dumps(manifest).encode(),
                              content_type="application/octet-stream", headers=headers,
                              query_string="multipart-manifest=put")
        self.published = True
        if got and got.strip('"') != slo_etag:  # Swift and RGW both answer the SLO's ETag
            raise BackendError(f"{self._what()}: manifest PUT returned ETag {got}, expected "
                               f"{slo_etag}")
        return self._verify(slo_etag, self.size, slo=True)

    def _verify(self, etag: str, size: int, slo: bool) -> ImageInfo:
        """A full HEAD of what was published (the SLO itself, not our metadata about it):
        it must be ours, whole."""
        try:
            h = self.store._call(f"{self.name}: HEAD", "head_object", self.store.container,
                                 self.name, headers={"X-Newest": "true"})
        except NotFound as e:  # deleted at once by someone else
            raise BackendError(f"{e} right after publishing") from None
        parsed = self.store._info(self.name, h)
        assert parsed is not None
        info, group, is_slo = parsed
        with self.store._lock:
            self.store._heads[self.name] = (info.version, info.size, group, None)
        if info.version != etag or (slo and group != self.group):
            raise BackendError(f"{self._what()}: replaced by another writer right after "
                               f"publishing (ETag {info.version}, ours {etag})")
        if info.size != size or is_slo != slo:
            raise BackendError(f"{self._what()}: published {info.size} bytes "
                               f"({'SLO' if is_slo else 'object'}), expected {size}")
        meta = {k: v for k, v in info.meta.items() if k not in _OWN_META}
        return ImageInfo(name=info.name, size=info.size, mtime=info.mtime, mode=info.mode,
                         version=info.version, meta=meta)

    def abort(self) -> None:
        if self.state == "committing":
            return  # commit owns the outcome: its manifest PUT may be in flight
        if self.finished:
            return
        self.dead = True  # an abandoned write stops at its next chunk and lets go of the lock
        for seg in list(self.segments):
            seg.aborted = True
            with seg.lock:
                seg.closed = True
                try:
                    seg.q.put_nowait(_ABORT)
                except queue.Full:
                    pass  # the sender sees ``aborted`` at its next chunk
        if not self.lock.acquire(timeout=self.store.timeout):
            log.warning("%s: abort: a write is still running; its marker stays for the "
                        "clean-up at the next mount", self._what())
            return
        try:
            if self.finished:
                return  # commit started meanwhile: it owns the outcome
            self.state = "aborted"
        finally:
            self.lock.release()
        self._discard()

    def _discard(self) -> None:
        """Stop the segment PUTs and delete the segments; the marker goes only if they are all
        gone and no PUT can still create one."""
        self.small = None
        self._give_small()
        self.dead = True
        for seg in list(self.segments):
            seg.aborted = True
            with seg.lock:
                seg.closed = True
                try:
                    seg.q.put_nowait(_ABORT)
                except queue.Full:
                    pass
        if self.pool is not None:  # segments not started yet never start
            self.pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + self.store.timeout
        for seg in self.segments:
            if seg.future is not None:
                try:
                    seg.future.result(timeout=max(0.0, deadline - time.monotonic()))
                except BaseException:
                    pass
        for seg in self.segments:  # a PUT still running drains its own queue when it ends
            if seg.future is None or seg.future.done():
                seg.drain()
        if not self.marker:
            return
        running = any(s.future is not None and not s.future.done() for s in self.segments)
        started = [s.obj for s in self.segments
                   if s.future is None or not s.future.cancelled()]
        gone = self.store._delete_group(self.group, started)[1]
        if gone and not running:
            self.store._delete_quietly(self.store.segment_container, PENDING_PREFIX + self.uid)
        else:
            log.warning("%s: abort left segments (%s); the marker stays for the clean-up at "
                        "the next mount", self._what(),
                        "a PUT still running" if running else "deletes failed")


class SwiftStore(Store):
    type_name = "swift"
    OPTIONS = {
        "auth_url": Option("str", default=None,
                           help="auth URL; default $ST_AUTH (v1) or $OS_AUTH_URL (v3)"),
        "auth_version": Option(("1", "3"), default=None,
                               help='"1" (tempauth, RGW) or "3" (Keystone)'),
        "user": Option("str", default=None, help="default $ST_USER or $OS_USERNAME"),
        "key_file": Option("secret_file", default=None,
                           help="file holding the key; default $ST_KEY or $OS_PASSWORD"),
        "project_name": Option("str", default=None, help="Keystone v3 project"),
        "user_domain_name": Option("str", default=None, help="Keystone v3 user domain"),
        "project_domain_name": Option("str", default=None, help="Keystone v3 project domain"),
        "region_name": Option("str", default=None, help="Keystone region of the endpoint"),
        "container": Option("str", required=True, help="container of the images"),
        "segment_container": Option("str", default=None,
                                    help='SLO segments; default "<container>_segments"'),
        "segment_size": Option("size", default=100 * MiB, help="SLO segment size"),
        "upload_concurrency": Option("int", default=2, help="segment PUTs in flight per upload"),
        "upload_memory": Option("size", default=64 * MiB,
                                help="buffers of all uploads of the store together"),
        "retries": Option("int", default=3, help="retries of idempotent requests"),
        "leftover_age": Option("float", default=86400.0,
                               help="seconds after which another host's unfinished upload is "
                                    "removed at mount"),
        "cacert": Option("path", default=None,
                         help="CA bundle (PEM) to verify the server's TLS certificate; default "
                              "the system's"),
        "insecure": Option("bool", default=False,
                           help="do not verify the server's TLS certificate"),
        "glance_reference": Option("str", default=None,
                                   help="glance-swift.conf reference: locations become "
                                        "swift+config://REF/container/name"),
    }
    default_concurrency = 8

    def __init__(self, cfg: StoreConfig) -> None:
        super().__init__(cfg)
        o = self.options
        self.container: str = o["container"]
        self.segment_container: str = o["segment_container"] or f"{self.container}_segments"
        self.segment_size: int = o["segment_size"]
        self.upload_concurrency: int = o["upload_concurrency"]
        # Shared by every upload of this store, ``upload_memory`` in two halves. Small images
        # held whole until close (an idle writer may hold them for hours) only ever take what
        # is free, else stream as SLOs; queued chunks wait for room, which sends always free,
        # so small buffers can never starve a streaming upload.
        half = o["upload_memory"] // 2
        self.small_memory = MemoryBudget(half, f"store {self.id} (small images)")
        self.memory = MemoryBudget(o["upload_memory"] - half, f"store {self.id} (segment PUTs)")
        self.retries: int = o["retries"]
        self.max_segments = 1000
        self.max_object = 5 << 30
        self._auth = _resolved(o)
        self._key: str | None = None
        self._url: str | None = None
        self._token: str | None = None
        self._local = threading.local()
        #: every Connection made (one per thread), closed by close()
        self._conns: list[Any] = []
        self._ssl: ssl.SSLContext | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        #: name -> (listing key, info, segment group, DLO, DLO segments' fingerprint)
        self._cache: dict[str, tuple[tuple[Any, ...], ImageInfo, str | None, _Dlo | None,
                                     str | None]] = {}
        self._if_match = True
        #: (name, version) -> (map or None, monotonic time it was built)
        self._segment_maps: dict[tuple[str, str], tuple[_SegmentMap | None, float]] = {}
        #: one lock per (name, version) being mapped: unrelated images never wait for each other
        self._map_locks: dict[tuple[str, str], threading.Lock] = {}
        #: name -> (version, size, segment group, DLO) of the last HEAD, for the segment map.
        self._heads: dict[str, tuple[str, int, str | None, _Dlo | None]] = {}
        self._sc: Any = None
        self._ClientException: type[Exception] = Exception
        _import_client_here()

    # ------------------------------------------------------------------ configuration
    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        a = _resolved(options)
        if a["auth_version"] not in ("1", "3"):
            raise OptionError("auth_version", f'expected "1" or "3" (the environment says '
                                              f'{a["auth_version"]!r})')
        url = a["auth_url"]
        if not url:
            raise OptionError("auth_url", "expected the auth URL (or ST_AUTH / OS_AUTH_URL in "
                                          "the environment)")
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise OptionError("auth_url", f"expected an http:// or https:// URL, got {url!r}")
        if parsed.username or parsed.password:
            raise OptionError("auth_url", "expected a URL without credentials (use key_file)")
        if not a["user"]:
            raise OptionError("user", "expected a user name (or ST_USER / OS_USERNAME in the "
                                      "environment)")
        if not a["key_file"] and not a["key_env"]:
            raise OptionError("key_file", "expected a file holding the key (or ST_KEY / "
                                          "OS_PASSWORD in the environment)")
        if a["auth_version"] == "3":
            for k in ("project_name", "user_domain_name", "project_domain_name"):
                if not a[k]:
                    env = {"project_name": "OS_PROJECT_NAME",
                           "user_domain_name": "OS_USER_DOMAIN_NAME",
                           "project_domain_name": "OS_PROJECT_DOMAIN_NAME"}[k]
                    raise OptionError(k, f'expected a value with auth_version = "3" (or {env} '
                                         f"in the environment)")
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
        if options["leftover_age"] < 0:
            raise OptionError("leftover_age", "expected a number of seconds ≥ 0")
        ref = options.get("glance_reference")
        if ref is not None and (not ref or "/" in ref or "@" in ref):
            raise OptionError("glance_reference", "expected a glance-swift.conf reference name")

    # ------------------------------------------------------------------ connections
    def open(self) -> None:
        import swiftclient.client  # lazy: validating a config must not need it

        self._sc = swiftclient.client
        self._ClientException = swiftclient.client.ClientException
        # swiftclient's request log may show a prefix of tokens and keys: show none
        swiftclient.client.logger_settings["reveal_sensitive_prefix"] = 0
        a = self._auth
        if a["key_file"]:
            try:
                with open(a["key_file"], encoding="utf-8") as f:
                    self._key = f.read().strip()
            except OSError as e:
                raise BackendError(f"store {self.id}: cannot read key_file {a['key_file']}: "
                                   f"{e.strerror}") from None
            if not self._key:
                raise BackendError(f"store {self.id}: key_file {a['key_file']} is empty")
        else:
            self._key = a["key_env"]
        try:
            self._ssl = ssl.create_default_context(cafile=self.options.get("cacert"))
        except (OSError, ssl.SSLError) as e:
            raise BackendError(f"store {self.id}: cacert {self.options.get('cacert')}: "
                               f"{e}") from None
        if self.options.get("insecure"):
            self._ssl.check_hostname = False
            self._ssl.verify_mode = ssl.CERT_NONE
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, self.cfg.concurrency or self.default_concurrency),
            thread_name_prefix=f"swift-{self.id}")
        try:
            self._container_ready(self.container)
            if not self.read_only:
                self._container_ready(self.segment_container)
        except BackendError:
            self.close()
            raise
        try:
            caps = self._invoke("get_capabilities")
            self.max_segments = int(caps.get("slo", {}).get("max_manifest_segments", 1000))
            self.max_object = int(caps.get("swift", {}).get("max_file_size", 5 << 30))
        except Exception as e:  # /info is optional: keep Swift's defaults
            log.debug("store %s: no /info (%s); assuming 1000 segments of at most 5GiB",
                      self.id, e)

    def _container_ready(self, container: str) -> None:
        try:
            self._call(f"container {container}: HEAD", "head_container", container)
        except NotFound:
            if self.read_only:
                raise BackendError(f"store {self.id}: container {container} does not exist "
                                   f"(the store is read-only, so it is not created)") from None
            self._call(f"container {container}: PUT", "put_container", container, write=True)
            log.info("store %s: created container %s", self.id, container)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.close()
            except Exception as e:  # closing must not fail the unmount
                log.debug("store %s: closing a connection: %s", self.id, e)
        self._local = threading.local()

    def _conn(self) -> Any:
        """This thread's swiftclient Connection (they are not thread-safe), sharing one token."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self._sc is None:
            raise BackendError(f"store {self.id}: not opened")
        a = self._auth
        os_options: dict[str, str] = {}
        if a["auth_version"] == "3":
            os_options = {k: a[k] for k in ("project_name", "user_domain_name",
                                            "project_domain_name", "region_name") if a[k]}
        elif a["region_name"]:
            os_options["region_name"] = a["region_name"]
        conn = self._sc.Connection(
            authurl=a["auth_url"], user=a["user"], key=self._key,
            auth_version=a["auth_version"], os_options=os_options,
            preauthurl=self._url, preauthtoken=self._token,
            retries=self.retries, starting_backoff=0.25, max_backoff=4,
            timeout=self.timeout, retry_on_ratelimit=True,
            cacert=self.options.get("cacert"), insecure=bool(self.options.get("insecure")))
        self._local.conn = conn
        with self._lock:
            self._conns.append(conn)
        return conn

    def _invoke(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``Connection.<method>`` of this thread; swiftclient's exceptions pass through."""
        conn = self._conn()
        try:
            return getattr(conn, method)(*args, **kwargs)
        finally:
            if conn.token and conn.token != self._token:  # (re)authenticated: share it
                self._url, self._token = conn.url, conn.token

    def _call(self, what: str, method: str, *args: Any, write: bool = False,
              **kwargs: Any) -> Any:
        """Like ``_invoke``, with errors mapped to the store's exceptions."""
        try:
            return self._invoke(method, *args, **kwargs)
        except self._ClientException as e:
            raise self._error(e, what, write) from None
        except OSError as e:  # sockets; requests' exceptions are OSErrors too
            raise BackendError(f"store {self.id}: {what}: {type(e).__name__}: {e}",
                               retryable=True) from None

    def _error(self, e: Any, what: str, write: bool) -> StoreError:
        """The store's exception for a swiftclient one; its ``status`` is the HTTP status."""
        err = self._error_of(e, what, write)
        err.status = getattr(e, "http_status", None)  # type: ignore[attr-defined]
        return err

    def _error_of(self, e: Any, what: str, write: bool) -> StoreError:
        status = getattr(e, "http_status", None)
        if status is None:
            return BackendError(f"store {self.id}: {what}: {e}")
        msg = f"store {self.id}: {what}: HTTP {status} {getattr(e, 'http_reason', '') or ''}"
        msg = msg.rstrip()
        if status == 404:
            return NotFound(msg)
        if status == 412:
            return Changed(msg)
        if status == 401:
            return BackendError(msg + " (authentication failed: check user and key)")
        if status == 403:
            return ReadOnly(msg) if write else BackendError(msg)
        if status in (413, 507):
            return NoSpace(msg)
        return BackendError(msg, retryable=status in (408, 429, 498, 499) or status >= 500)

    # ------------------------------------------------------------------ segment PUTs
    def _segment_target(self, index: int) -> int:
        """Segment sizes double every quarter of the server's segment limit (images beyond
        ``max_segments × segment_size`` still fit); memory does not depend on them."""
        tier = index // max(1, self.max_segments // 4)
        return min(self.segment_size << tier, self.max_object)

    def _send_segment(self, seg: _Segment) -> None:
        """One chunked PUT of ``seg`` (runs in an upload's pool thread)."""
        if self._url is None or self._token is None:
            raise BackendError(f"store {self.id}: not authenticated")
        url = urllib.parse.urlsplit(self._url)
        conn = (http.client.HTTPSConnection(url.hostname or "", url.port, timeout=self.timeout,
                                            context=self._ssl)
                if url.scheme == "https" else
                http.client.HTTPConnection(url.hostname or "", url.port, timeout=self.timeout))
        path = (url.path.rstrip("/") + "/" + urllib.parse.quote(self.segment_container, safe="")
                + "/" + urllib.parse.quote(seg.obj, safe="/"))
        what = f"segment {seg.obj}: PUT"
        idle = max(0.5, min(20.0, self.timeout / 2))
        try:
            self._send_segment_on(conn, path, what, seg, idle)
        finally:
            if seg.aborted:  # nobody will send what is still queued
                seg.drain()

    def _send_segment_on(self, conn: http.client.HTTPConnection, path: str, what: str,
                         seg: _Segment, idle: float) -> None:
        try:
            try:
                conn.putrequest("PUT", path, skip_accept_encoding=True)
                conn.putheader("X-Auth-Token", self._token)
                conn.putheader("Transfer-Encoding", "chunked")
                conn.putheader("Content-Type", "application/octet-stream")
                conn.endheaders()
                for chunk in seg.chunks(idle):
                    conn.send(b"%x\r\n" % len(chunk))
                    conn.send(chunk)
                    conn.send(b"\r\n")
                conn.send(b"0\r\n\r\n")
            except OSError:
                pass  # the server may have answered early (401, 413...): read it below
            try:
                resp = conn.getresponse()
                resp.read()
            except (OSError, http.client.HTTPException) as e:
                raise BackendError(f"store {self.id}: {what}: {type(e).__name__}: {e}",
                                   retryable=True) from None
        finally:
            conn.close()
        if resp.status == 401:
            self._reauthenticate()
        if not 200 <= resp.status < 300:
            err = self._ClientException(what, http_status=resp.status, http_reason=resp.reason)
            raise self._error(err, what, write=True)
        etag = (resp.getheader("Etag") or "").strip('"')
        if etag != seg.md5.hexdigest():
            raise BackendError(f"store {self.id}: {what}: ETag {etag!r} does not match the "
                               f"bytes sent ({seg.md5.hexdigest()})")
        seg.etag = etag

    def _reauthenticate(self) -> None:
        conn = self._conn()
        try:
            conn.url = conn.token = None
            self._url, self._token = conn.get_auth()
        except Exception as e:
            log.warning("store %s: re-authentication failed: %s", self.id, e)

    # ------------------------------------------------------------------ helpers
    def _info(self, name: str, headers: Mapping[str, str], manifest: bool = False
              ) -> tuple[ImageInfo, str | None, bool] | None:
        """(info, segment group of our SLOs, is an SLO) from HEAD's headers.

        ``manifest``: the headers come from ``?multipart-manifest=get``, which describe an
        SLO's manifest object rather than the image: usable only with the size and ETag our
        manifest PUT recorded; None for other SLOs and for DLOs (a full HEAD is needed).
        """
        meta = _meta_of(headers)
        group = meta.pop(SEGMENTS_META, None)
        own_size, own_etag = meta.pop(SIZE_META, None), meta.pop(ETAG_META, None)
        # RGW marks an SLO's manifest with a user-metadata flag only (filtered from ``meta``)
        is_slo = "true" in (headers.get("x-static-large-object", "").lower(),
                            headers.get(_META + "static-large-object", "").lower())
        size_text, version = headers.get("content-length"), headers.get("etag", "").strip('"')
        if manifest:
            if is_slo and group and own_size and own_etag:
                size_text, version = own_size, own_etag
            elif is_slo or "x-object-manifest" in headers or size_text in ("0", None):
                return None  # foreign SLO, DLO, or on RGW an SLO whose flag a POST removed
        try:
            size = int(size_text or "")
        except ValueError:
            raise BackendError(f"store {self.id}: {name}: no usable Content-Length") from None
        try:
            stamp = float(headers.get("x-timestamp", ""))
        except ValueError:
            stamp = _http_date(headers.get("last-modified"))
        info = ImageInfo(name=name, size=size, mtime=meta_mtime(meta, stamp),
                         mode=meta_mode(meta), version=version, meta=meta)
        return info, (group if is_slo else None), is_slo

    def _head_headers(self, name: str, newest: bool = False
                      ) -> tuple[Mapping[str, str], tuple[ImageInfo, str | None, bool]]:
        """HEAD ``name``: its headers and what ``_info`` makes of them.

        First the manifest only (``?multipart-manifest=get``; plain objects answer as usual):
        RGW 16.2 answers a full HEAD of an SLO at once but then reads the whole object on that
        connection (≈0.6 s per GiB here, charged to the next request); our SLOs carry their
        size and ETag in metadata, so only foreign SLOs need the full HEAD as well.
        """
        headers = {"X-Newest": "true"} if newest else None
        h = self._call(f"{name}: HEAD", "head_object", self.container, name, headers=headers,
                       query_string="multipart-manifest=get")
        parsed = self._info(name, h, manifest=True)
        if parsed is None:
            h = self._call(f"{name}: HEAD", "head_object", self.container, name,
                           headers=headers)
            parsed = self._info(name, h)
            assert parsed is not None
        return h, parsed

    def _head(self, name: str, newest: bool = False) -> tuple[ImageInfo, str | None, bool]:
        return self._head_full(name, newest)[:3]

    def _head_full(self, name: str, newest: bool = False
                   ) -> tuple[ImageInfo, str | None, bool, _Dlo | None]:
        """``_head`` and the DLO the object is, if it is one."""
        h, (info, group, is_slo) = self._head_headers(name, newest)
        dlo = _dlo_of(h)
        with self._lock:
            if len(self._heads) >= 1024:
                self._heads.pop(next(iter(self._heads)))
            self._heads[name] = (info.version, info.size, group, dlo)
        return info, group, is_slo, dlo

    def _group_of_existing(self, name: str) -> tuple[str | None, _Dlo | None]:
        """The segment group of the image now called ``name`` if it is one of our SLOs, and
        its DLO if it is one (replacing it must not leave its segments behind as images)."""
        try:
            _, group, _, dlo = self._head_full(name, newest=True)
        except NotFound:
            return None, None
        return group, dlo

    def _iter_container(self, container: str, prefix: str | None = None
                        ) -> Iterator[list[dict[str, Any]]]:
        """Listing pages, following markers: memory stays at one page."""
        marker = ""
        while True:
            _, page = self._call(f"container {container}: GET", "get_container", container,
                                 marker=marker, limit=LIST_PAGE, prefix=prefix)
            if not page:
                return
            yield page
            marker = page[-1].get("name") or page[-1].get("subdir", "")

    def _put_marker(self, uid: str, record: Mapping[str, Any]) -> None:
        body = json.dumps({**record, "created": time.time()}).encode()
        self._call(f"marker {uid}: PUT", "put_object", self.segment_container,
                   PENDING_PREFIX + uid, body, content_length=len(body),
                   content_type="application/json", write=True)

    def _delete_quietly(self, container: str, obj: str) -> bool:
        try:
            self._call(f"{container}/{obj}: DELETE", "delete_object", container, obj, write=True)
            return True
        except NotFound:
            return False
        except StoreError as e:
            log.warning("store %s: %s", self.id, e)
            return False

    def _gone(self, container: str, obj: str) -> int:
        """DELETE ``obj``: 1 if deleted, 0 if it was not there, -1 if the DELETE failed."""
        try:
            self._call(f"{container}/{obj}: DELETE", "delete_object", container, obj, write=True)
        except NotFound:
            return 0
        except StoreError as e:
            log.warning("store %s: %s", self.id, e)
            return -1
        return 1

    def _delete_group(self, group: str, names: Any = ()) -> tuple[int, bool]:
        """Delete every segment of ``group``: those a prefix listing shows and ``names`` (known
        to exist even if the listing lags), in parallel: (segments deleted, all gone). All gone
        only if every DELETE worked and a new listing shows none left: only then may the
        group's marker go."""
        todo = set(names)
        try:
            for page in self._iter_container(self.segment_container, prefix=group + "/"):
                todo.update(o["name"] for o in page if "name" in o)
        except StoreError as e:
            log.warning("store %s: segments of %s: %s", self.id, group, e)
            ok = False
        else:
            ok = True
        if self._pool is not None and len(todo) > 1:
            results = list(self._pool.map(lambda o: self._gone(self.segment_container, o),
                                          sorted(todo)))
        else:
            results = [self._gone(self.segment_container, o) for o in sorted(todo)]
        n = sum(r for r in results if r > 0)
        if not ok or -1 in results:
            return n, False
        try:
            left = next(self._iter_container(self.segment_container, prefix=group + "/"), [])
        except StoreError:
            return n, False
        return n, not any(o.get("name") for o in left)

    def _referenced(self, group: str, exclude: str | None = None) -> bool:
        """Whether a manifest other than ``exclude`` names ``group`` (every image is looked at,
        as ``cleanup_leftovers`` does): a copy (rename) shares its source's segments."""
        return any(g == group for info, g in self._listing() if info.name != exclude)

    def _drop_group(self, group: str, marker_uid: str, exclude: str | None = None) -> None:
        """Delete the segments of a replaced or deleted SLO unless another manifest uses them,
        then the marker ``marker_uid`` — which stays if that failed (the next mount retries)."""
        try:
            if self._referenced(group, exclude):
                log.info("store %s: segments %s are still used by another manifest: kept",
                         self.id, group)
            elif not self._delete_group(group)[1]:
                log.warning("store %s: segments %s not all deleted; the clean-up at the next "
                            "mount retries", self.id, group)
                return
        except StoreError as e:
            log.warning("store %s: segments %s: %s; the clean-up at the next mount retries",
                        self.id, group, e)
            return
        self._delete_quietly(self.segment_container, PENDING_PREFIX + marker_uid)

    def _forget(self, *names: str) -> None:
        with self._lock:
            for n in names:
                self._cache.pop(n, None)

    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnly(f"store {self.id} is read-only")

    # ------------------------------------------------------------------ reading
    def _listing(self, hide_segments: bool = False
                 ) -> Iterator[tuple[ImageInfo, str | None]]:
        """Every image with its segment group (see ``_scan``)."""
        for info, group, _dlo in self._scan(hide_segments):
            yield info, group

    def _entries(self) -> list[tuple[str, tuple[Any, ...]]]:
        """Every object of the container as (name, listing key), in name order. The key
        (hash, last_modified, bytes) changes with every PUT and POST of the object."""
        every = [(str(o["name"]), (o.get("hash"), o.get("last_modified"), o.get("bytes")))
                 for page in self._iter_container(self.container) for o in page
                 if o.get("name")]
        every.sort()  # the servers' byte order is code point order; sorted() makes sure
        return every

    @staticmethod
    def _covered(every: list[tuple[str, tuple[Any, ...]]], names: list[str], prefix: str
                 ) -> list[tuple[str, tuple[Any, ...]]]:
        """The entries of ``every`` (sorted, ``names`` its names) whose names start with
        ``prefix``: a DLO's segments as this listing sees them."""
        i = bisect.bisect_left(names, prefix)
        j = i
        while j < len(names) and names[j].startswith(prefix):
            j += 1
        return every[i:j]

    def _scan(self, hide_segments: bool = True
              ) -> list[tuple[ImageInfo, str | None, _Dlo | None]]:
        """Every image with its segment group and DLO, HEADing only entries that changed.

        A listing has no user metadata (and on RGW no SLO or DLO sizes), so each entry is
        HEADed once and remembered by its listing key. A DLO's bytes change when its segments
        do, not its manifest, so a remembered DLO also keeps a fingerprint of its segments'
        listing keys (segments in this container; a DLO whose segments are elsewhere is HEADed
        every time). ``hide_segments``: leave out the objects a listed DLO of this container
        uses as segments (Glance's ``<id>-00001``...), as SLO segments never show: they are
        parts of an image, not images.
        """
        every = self._entries()
        names = [n for n, _ in every]

        def fingerprint(dlo: _Dlo | None) -> str | None:
            if dlo is None or dlo.container != self.container:
                return None
            return hashlib.md5(repr(self._covered(every, names, dlo.prefix)).encode(),
                               usedforsecurity=False).hexdigest()

        found: dict[str, tuple[ImageInfo, str | None, _Dlo | None]] = {}
        todo: dict[str, tuple[tuple[Any, ...], Any]] = {}
        pool = self._pool
        for name, key in every:
            if is_hidden(name):
                continue
            try:
                check_name(name)
            except InvalidName:
                continue  # names with '/', too long...: not images of a flat store
            with self._lock:
                hit = self._cache.get(name)
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
                self._cache[name] = (key, *item, fingerprint(item[2]))
        seen = set(names)
        with self._lock:
            self._cache = {n: v for n, v in self._cache.items() if n in seen}
        segments: set[str] = set()
        if hide_segments:
            for name, (_info, _group, dlo) in found.items():
                if dlo is not None and dlo.container == self.container:
                    segments.update(n for n, _ in self._covered(every, names, dlo.prefix)
                                    if n != name)
        return [found[n] for n in names if n in found and n not in segments]

    def _head_for_listing(self, name: str
                          ) -> tuple[ImageInfo, str | None, _Dlo | None] | None:
        try:
            info, group, _, dlo = self._head_full(name)
        except NotFound:
            return None
        return info, group, dlo

    def _dlo_manifests(self) -> dict[str, _Dlo]:
        """Every DLO manifest of the container (name -> DLO), for the checks before a write,
        rename or delete: one listing, and a HEAD of the manifest alone only for entries not
        remembered by their listing key that list 0 bytes. A DLO manifest's own body is empty
        (Swift ignores it; Glance and the swift CLI write none), which the listing shows, so
        the images themselves are never HEADed here."""
        out: dict[str, _Dlo] = {}
        for name, key in self._entries():
            with self._lock:
                hit = self._cache.get(name)
            if hit is not None and hit[0] == key:
                dlo = hit[3]
            elif key[2] in (0, "0"):
                try:
                    h = self._call(f"{name}: HEAD", "head_object", self.container, name,
                                   query_string="multipart-manifest=get")
                except NotFound:
                    continue
                dlo = _dlo_of(h)
            else:
                continue
            if dlo is not None:
                out[name] = dlo
        return out

    def _refuse_if_segment(self, name: str, what: str, manifests: Mapping[str, _Dlo] | None
                           = None) -> None:
        """Busy (EBUSY) if ``name`` is, or would become, a segment of a DLO of the container:
        deleting, replacing or renaming it would change that image's bytes under Glance."""
        manifests = self._dlo_manifests() if manifests is None else manifests
        users = sorted(m for m, dlo in manifests.items()
                       if m != name and dlo.covers(self.container, name))
        if users:
            log.warning("store %s: refusing to %s %s: it is a segment of the large object%s "
                        "%s (X-Object-Manifest %s/%s)", self.id, what, name,
                        "s" if len(users) > 1 else "", ", ".join(users[:5]),
                        manifests[users[0]].container, manifests[users[0]].prefix)
            raise Busy(f"{self.id}/{name} is a segment of {', '.join(users[:5])}")

    def _drop_dlo_segments(self, dlo: _Dlo, exclude: str) -> None:
        """Delete the segments of a DLO whose manifest ``exclude`` was just deleted or
        replaced, except those another manifest still covers (a copy of the manifest shares
        them). Segments in another container are left alone: manifests there cannot be
        checked from this store."""
        if dlo.container != self.container:
            log.info("store %s: %s was a large object with segments in container %s: they "
                     "are kept", self.id, exclude, dlo.container)
            return
        others = [d for m, d in self._dlo_manifests().items() if m != exclude]
        todo = [n for page in self._iter_container(self.container, prefix=dlo.prefix)
                for n in (str(o.get("name", "")) for o in page)
                if n and n != exclude and not any(d.covers(self.container, n) for d in others)]
        if not todo:
            return
        if self._pool is not None and len(todo) > 1:
            results = list(self._pool.map(lambda o: self._gone(self.container, o), todo))
        else:
            results = [self._gone(self.container, o) for o in todo]
        self._forget(*todo)
        if -1 in results:
            log.warning("store %s: %d of %d segments of %s (%s/%s*) could not be deleted: they "
                        "now show as images", self.id, results.count(-1), len(todo), exclude,
                        dlo.container, dlo.prefix)
        else:
            log.info("store %s: deleted the %d segments of %s", self.id, len(todo), exclude)

    def list(self) -> Iterator[ImageInfo]:
        for info, _group, _dlo in self._scan(hide_segments=True):
            yield info

    def stat(self, name: str) -> ImageInfo:
        check_name(name)
        return self._head(name)[0]

    def read_range(self, name: str, version: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        segments = self._segment_map(name, version)
        if segments is not None:
            return self._read_segments(name, segments, offset, length)
        return self._read_object(name, version, offset, length)

    def _segment_map(self, name: str, version: str) -> _SegmentMap | None:
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
        with self._lock:
            lock = self._map_locks.setdefault(key, threading.Lock())
        if not lock.acquire(timeout=self.timeout):
            raise BackendError(f"store {self.id}: {name}: segment map busy for "
                               f"{self.timeout:g}s", retryable=True)
        try:
            hit = self._cached_map(key)
            if hit is not None:
                return hit[0]
            with self._lock:
                seen = self._heads.get(name)
            if seen is None or seen[0] != version:  # stat() before open() usually saw it
                try:
                    info, group, _, dlo = self._head_full(name)
                except NotFound:  # deleted while open: EIO like any change, not ENOENT
                    raise Changed(f"{self.id}/{name} changed since it was opened") from None
                if info.version != version:
                    raise Changed(f"{self.id}/{name} changed since it was opened")
                seen = (info.version, info.size, group, dlo)
            smap = self._build_segment_map(name, version, size=seen[1], group=seen[2],
                                           dlo=seen[3])
            with self._lock:
                if len(self._segment_maps) >= 256:
                    self._segment_maps.pop(next(iter(self._segment_maps)))
                # a listing that did not add up may only lag: None is retried later
                retry = seen[2] is not None or seen[3] is not None
                self._segment_maps[key] = (smap, time.monotonic() if retry else float("inf"))
            return smap
        finally:
            lock.release()
            with self._lock:
                if self._map_locks.get(key) is lock and not lock.locked():
                    del self._map_locks[key]

    #: Seconds a "no usable segment listing" answer for one of our SLOs is trusted.
    MAP_RETRY = 5.0

    def _cached_map(self, key: tuple[str, str]) -> tuple[_SegmentMap | None] | None:
        with self._lock:
            hit = self._segment_maps.get(key)
            if hit is None:
                return None
            smap, built = hit
            if smap is None and built != float("inf") and \
                    time.monotonic() - built > self.MAP_RETRY:
                del self._segment_maps[key]
                return None
            return (smap,)

    def _build_segment_map(self, name: str, version: str, size: int, group: str | None,
                           dlo: _Dlo | None = None) -> _SegmentMap | None:
        """The segment map if the listing of ``group`` (our SLO) or of ``dlo``'s prefix adds
        up to ``version`` and ``size``. A DLO's empty segments count in its ETag only."""
        if group is not None:
            container, prefix = self.segment_container, group + "/"
        elif dlo is not None:
            container, prefix = dlo.container, dlo.prefix
        else:
            return None
        try:
            entries = [o for page in self._iter_container(container, prefix=prefix)
                       for o in page if o.get("name")]
        except NotFound:  # a DLO naming a container that is gone
            entries = []
        etags = [str(o.get("hash", "")).strip('"') for o in entries]
        sizes = [int(o.get("bytes", -1)) for o in entries]
        digest = hashlib.md5("".join(etags).encode(), usedforsecurity=False).hexdigest()
        if group is None:  # DLO: its empty segments add no bytes
            keep = [i for i, n in enumerate(sizes) if n != 0]
            entries, etags, sizes = ([entries[i] for i in keep], [etags[i] for i in keep],
                                     [sizes[i] for i in keep])
        if not entries or digest != version or sum(sizes) != size or min(sizes) <= 0:
            log.debug("store %s: segments of %s do not add up to version %s; reading "
                      "through the manifest", self.id, name, version)
            return None
        starts = [0]
        for n in sizes[:-1]:
            starts.append(starts[-1] + n)
        return _SegmentMap(starts, sizes, [o["name"] for o in entries], etags, container)

    def _read_segments(self, name: str, smap: _SegmentMap, offset: int, length: int) -> bytes:
        total = smap.starts[-1] + smap.sizes[-1]
        end = min(offset + length, total)
        parts: list[bytes] = []
        i = bisect.bisect_right(smap.starts, offset) - 1
        while offset < end:
            start, size = smap.starts[i], smap.sizes[i]
            n = min(end, start + size) - offset
            parts.append(self._get_range(smap.container, smap.names[i], smap.etags[i],
                                         offset - start, n, what=f"{name} (segment {i})",
                                         changed=f"{self.id}/{name}"))
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
            h, body = self._invoke("get_object", container, obj, headers=headers,
                                   response_dict=resp)
        except self._ClientException as e:
            if getattr(e, "http_status", None) in (404, 412):
                raise Changed(f"{changed} changed since it was opened") from None
            raise self._error(e, what, False) from None
        except OSError as e:
            raise BackendError(f"store {self.id}: {what}: {type(e).__name__}: {e}",
                               retryable=True) from None
        got = h.get("etag", "").strip('"')
        if got != etag:
            raise Changed(f"{changed} changed since it was opened (ETag {got})")
        data = self._ranged_body(what, resp.get("status"), h, body, offset, length)
        if len(data) != length:
            raise BackendError(f"store {self.id}: {what}: got {len(data)} bytes")
        return data

    def _read_object(self, name: str, version: str, offset: int, length: int) -> bytes:
        """A ranged GET of the image object itself (plain object or manifest)."""
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        if self._if_match:
            headers["If-Match"] = version
        what = f"{name}: GET {offset}+{length}"
        resp: dict[str, Any] = {}
        try:
            h, body = self._invoke("get_object", self.container, name, headers=headers,
                                   response_dict=resp)
        except self._ClientException as e:
            status = getattr(e, "http_status", None)
            if status == 416:
                return b""  # at or past the end (an empty image answers 416 too)
            if status == 404:  # deleted while open: EIO like any change, not ENOENT
                raise Changed(f"{self.id}/{name} changed since it was opened") from None
            if status != 412 or "If-Match" not in headers:
                raise self._error(e, what, False) from None
            try:
                unchanged = self._head(name, newest=True)[0].version == version
            except NotFound:
                unchanged = False
            if not unchanged:
                raise Changed(f"{self.id}/{name} changed since it was opened") from None
            log.info("store %s: the server refuses If-Match on unchanged large objects (RGW); "
                     "checking the ETag of each response instead", self.id)
            self._if_match = False
            return self._read_object(name, version, offset, length)
        except OSError as e:
            raise BackendError(f"store {self.id}: {what}: {type(e).__name__}: {e}",
                               retryable=True) from None
        got = h.get("etag", "").strip('"')
        if got != version:
            raise Changed(f"{self.id}/{name} changed since it was opened (ETag {got})")
        return self._ranged_body(what, resp.get("status"), h, body, offset, length)

    def _ranged_body(self, what: str, status: Any, h: Mapping[str, str], body: bytes,
                     offset: int, length: int) -> bytes:
        """The bytes asked for, after checking status, Content-Range and body length."""
        if status == 200:  # the whole object: the server ignored the range
            if len(body) != int(h.get("content-length", len(body))):
                raise BackendError(f"store {self.id}: {what}: short body")
            return body[offset:offset + length]
        if status != 206:
            raise BackendError(f"store {self.id}: {what}: HTTP {status} (expected 206)")
        m = _RANGE.match(h.get("content-range", ""))
        if not m or int(m.group(1)) != offset:
            raise BackendError(f"store {self.id}: {what}: bad Content-Range "
                               f"{h.get('content-range')!r}")
        expected = int(m.group(2)) - offset + 1
        if m.group(3) != "*" and expected != min(length, int(m.group(3)) - offset):
            raise BackendError(f"store {self.id}: {what}: Content-Range "
                               f"{h.get('content-range')!r} is not the range asked for")
        if len(body) != expected or expected > length:
            raise BackendError(f"store {self.id}: {what}: got {len(body)} bytes, "
                               f"Content-Range says {expected}")
        return body

    # ------------------------------------------------------------------ changing
    def upload(self, name: str, size_hint: int | None = None) -> Upload:
        self._writable()
        check_name(name)
        self._refuse_if_segment(name, "write")
        return SwiftUpload(self, name, size_hint)

    def rename(self, old: str, new: str) -> ImageInfo:
        """Copy the manifest (not the data) to ``new``, then delete the old manifest only.

        Between the copy and the DELETE two manifests share one segment group. A marker written
        before the copy (``op = "rename"``) lets the next mount finish a rename cut short by a
        crash; any other failure after the copy removes the copy again (a plain DELETE: the
        segments belong to ``old``) unless ``old`` is already gone.

        A DLO is renamed the same way (its manifest is copied, its segments stay); a DLO
        replaced by the rename loses its segments, unless another manifest uses them. A
        segment of a DLO is never renamed, and nothing is renamed onto a DLO's prefix (Busy).
        """
        self._writable()
        check_name(old)
        check_name(new)
        src, group, is_slo, dlo = self._head_full(old, newest=True)
        manifests = self._dlo_manifests()
        self._refuse_if_segment(old, "rename", manifests)
        if new != old:
            self._refuse_if_segment(new, "rename onto", manifests)
        target_group, target_dlo = self._group_of_existing(new)
        replaces = target_group is not None and target_group != group
        uid = None
        if group is not None or replaces:
            uid = new_owner_id()
            self._put_marker(uid, {"op": "rename", "image": new, "source": old, "group": group,
                                   "groups": [target_group] if replaces else []})
        source = "/" + urllib.parse.quote(self.container, safe="") + "/" + \
            urllib.parse.quote(old, safe="")
        try:
            # the manifest itself, not the concatenation, for an SLO and for a DLO
            self._call(f"{old} -> {new}: copy", "put_object", self.container, new, None,
                       headers={"X-Copy-From": source},
                       query_string="multipart-manifest=get" if is_slo or dlo else None,
                       write=True)
            info, _, _ = self._head(new, newest=True)
            if info.version != src.version or info.size != src.size:
                raise BackendError(f"store {self.id}: rename {old} -> {new}: the copy differs "
                                   f"(ETag {info.version}, size {info.size}; source "
                                   f"{src.version}, {src.size})")
            try:
                self._call(f"{old}: DELETE", "delete_object", self.container, old, write=True)
            except NotFound:
                pass
        except BaseException:
            self._forget(old, new)
            if dlo is not None:
                self._undo_dlo_copy(old, new, dlo)
            if group is not None and not self._undo_copy(old, new, group):
                raise  # the marker stays: the next mount settles it
            if uid is not None:
                if replaces:  # kept if ``new`` still holds it (the copy never happened)
                    assert target_group is not None
                    self._drop_group(target_group, uid)
                else:
                    self._delete_quietly(self.segment_container, PENDING_PREFIX + uid)
            raise
        self._forget(old, new)
        if uid is not None:
            if replaces:
                assert target_group is not None
                self._drop_group(target_group, uid, exclude=new)
            else:
                self._delete_quietly(self.segment_container, PENDING_PREFIX + uid)
        if target_dlo is not None and target_dlo != dlo and old != new:
            try:
                self._drop_dlo_segments(target_dlo, exclude=old)
            except StoreError as e:
                log.warning("store %s: segments of the large object %s replaced by a rename: "
                            "%s", self.id, new, e)
        return info

    def _undo_dlo_copy(self, old: str, new: str, dlo: _Dlo) -> None:
        """After a failed rename of a DLO: if ``old`` is still there, a manifest at ``new`` with
        the same prefix is our copy: plain-DELETE it (the segments stay ``old``'s)."""
        try:
            self._head(old, newest=True)
            if self._head_full(new, newest=True)[3] == dlo:
                self._call(f"{new}: DELETE (undo the copy)", "delete_object", self.container,
                           new, write=True)
        except NotFound:
            pass
        except StoreError as e:
            log.warning("store %s: rename %s -> %s: could not undo the copy: %s", self.id, old,
                        new, e)

    def _copy_exists(self, name: str, group: str | None) -> bool:
        """Whether ``name`` holds a manifest of ``group`` (None: unknown, so yes)."""
        try:
            return group is not None and self._head(name, newest=True)[1] == group
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
                if self._head(old, newest=True)[1] != group:
                    return True  # old is gone (its DELETE worked after all) or replaced
            except NotFound:
                return True
            if not self._copy_exists(new, group):
                return True
            self._call(f"{new}: DELETE (undo the copy)", "delete_object", self.container, new,
                       write=True)
            return True
        except NotFound:
            return True
        except StoreError as e:
            log.warning("store %s: rename %s -> %s: could not undo the copy: %s; the next "
                        "mount settles it", self.id, old, new, e)
            return False

    def delete(self, name: str) -> None:
        """Plain objects: one DELETE. SLOs: the manifest and its segment group (kept if another
        manifest uses it). DLOs: the manifest, then its segments (those in this container that
        no other manifest covers). A segment of a DLO is refused (Busy)."""
        self._writable()
        check_name(name)
        info, group, is_slo, dlo = self._head_full(name, newest=True)
        self._refuse_if_segment(name, "delete")
        if dlo is not None:
            self._call(f"{name}: DELETE (large object manifest)", "delete_object",
                       self.container, name, write=True)
            self._forget(name)
            self._drop_dlo_segments(dlo, exclude=name)
            return
        if not is_slo:
            self._call(f"{name}: DELETE", "delete_object", self.container, name, write=True)
            self._forget(name)
            return
        if group is None:  # a foreign SLO: the server deletes its segments
            self._multipart_delete(name, info.version)
            self._forget(name)
            return
        uid = new_owner_id()
        self._put_marker(uid, {"op": "delete", "image": name, "groups": [group]})
        try:
            shared = self._referenced(group, exclude=name)
        except BaseException:
            self._delete_quietly(self.segment_container, PENDING_PREFIX + uid)
            raise
        if shared:  # a copy uses the segments too: delete this manifest only
            try:
                self._call(f"{name}: DELETE", "delete_object", self.container, name,
                           write=True)
            except NotFound:
                pass
            finally:
                self._delete_quietly(self.segment_container, PENDING_PREFIX + uid)
            self._forget(name)
            return
        self._multipart_delete(name, info.version)
        self._forget(name)
        self._drop_group(group, uid, exclude=name)  # what the server's SLO delete missed

    def _multipart_delete(self, name: str, version: str) -> None:
        """DELETE ?multipart-manifest=delete: the manifest and its segments, server-side.

        Servers answer 2xx even when part of it failed (the body, which swiftclient drops,
        lists what): the caller sweeps our segment group afterwards, and a HEAD here makes
        sure the manifest itself is gone (a different version there is someone else's image).
        """
        self._call(f"{name}: DELETE (SLO)", "delete_object", self.container, name,
                   query_string="multipart-manifest=delete", write=True)
        try:
            still = self._head(name, newest=True)[0].version == version
        except NotFound:
            return
        if still:
            raise BackendError(f"store {self.id}: {name}: the SLO delete left the manifest")

    def set_meta(self, name: str, meta: Mapping[str, str], expect: str | None = None
                 ) -> ImageInfo:
        """POST replaces all user metadata: merge with what HEAD says first."""
        self._writable()
        check_name(name)
        h, (info, _, _) = self._head_headers(name, newest=True)
        if expect is not None and info.version != expect:
            raise Changed(f"{self.id}/{name} is no longer version {expect}")
        current = _meta_of(h, keep_server=True)
        merged = {**current, **{k: v for k, v in user_meta(meta).items()
                                if not k.startswith("imagefs_")}}
        self._call(f"{name}: POST", "post_object", self.container, name,
                   headers={**_meta_headers(merged), **_kept_headers(h)}, write=True)
        self._forget(name)
        # The POST is unconditional: if the image was replaced since the HEAD, it just gave the
        # new image the old one's size, ETag and segments. A full HEAD tells the real ones.
        h2 = self._call(f"{name}: HEAD", "head_object", self.container, name,
                        headers={"X-Newest": "true"})
        real = self._info(name, h2)
        assert real is not None
        want_etag = merged.get(ETAG_META) if merged.get(SEGMENTS_META) else info.version
        want_size = merged.get(SIZE_META) if merged.get(SEGMENTS_META) else str(info.size)
        if real[0].version != want_etag or str(real[0].size) != want_size:
            log.info("store %s: %s was replaced during set_meta: its own size and segments "
                     "are written back", self.id, name)
            own = self._own_meta(name, real[0], h2)
            asked = {k: v for k, v in user_meta(meta).items() if not k.startswith("imagefs_")}
            merged = {**own, **asked} if expect is None else own
            self._call(f"{name}: POST", "post_object", self.container, name,
                       headers={**_meta_headers(merged), **_kept_headers(h2)}, write=True)
            if expect is not None:
                raise Changed(f"{self.id}/{name} was replaced while its metadata was set")
            info = real[0]
        visible = {k: v for k, v in merged.items() if k not in _OWN_META + tuple(_SERVER_META)}
        return ImageInfo(name=name, size=info.size, mtime=meta_mtime(visible, info.mtime),
                         mode=meta_mode(visible), version=info.version, meta=visible)

    def _own_meta(self, name: str, real: ImageInfo, headers: Mapping[str, str]
                  ) -> dict[str, str]:
        """The metadata imagefs keeps on the object now called ``name`` (``real``: a full HEAD
        of it): for one of our SLOs its segment group — the group under the image's segment
        prefix whose listing adds up to its ETag and size — with the server's SLO flag."""
        is_slo = "true" in (headers.get("x-static-large-object", "").lower(),
                            headers.get(_META + "static-large-object", "").lower())
        if not is_slo:
            return {}
        groups: dict[str, list[dict[str, Any]]] = {}
        for page in self._iter_container(self.segment_container,
                                         prefix=_safe_name(name) + "/"):
            for o in page:
                groups.setdefault(str(o.get("name", "")).rsplit("/", 1)[0], []).append(o)
        own = {k: v for k, v in _meta_of(headers, keep_server=True).items()
               if k in _SERVER_META}
        for group, entries in groups.items():
            digest = hashlib.md5("".join(str(o.get("hash", "")).strip('"') for o in entries)
                                 .encode(), usedforsecurity=False).hexdigest()
            if digest == real.version and sum(int(o.get("bytes", 0)) for o in entries) == \
                    real.size:
                return {**own, SEGMENTS_META: group, SIZE_META: str(real.size),
                        ETAG_META: real.version}
        return own

    # ------------------------------------------------------------------ leftovers
    def cleanup_leftovers(self) -> int:
        """Delete segment groups of operations whose process is gone and no manifest uses.

        A marker's owner is gone when it ran on this host and its pid (with its start time) no
        longer runs; for another host, when the marker and its segments are older than
        ``leftover_age``. Groups referenced by a manifest (a crash right after publishing) are
        kept: first the image the marker names is checked, then, if needed, every manifest.
        """
        if self.read_only:
            return 0
        removed = 0
        referenced: set[str] | None = None
        age = self.options["leftover_age"]
        for page in self._iter_container(self.segment_container, prefix=PENDING_PREFIX):
            for entry in page:
                mname = entry.get("name", "")
                uid = mname[len(PENDING_PREFIX):]
                state = owner_state(uid)
                if state == "alive":
                    continue
                try:
                    _, body = self._call(f"marker {uid}: GET", "get_object",
                                         self.segment_container, mname)
                    record = json.loads(body)
                    groups = [g for g in record.get("groups", []) if isinstance(g, str) and g]
                    image = record.get("image")
                except NotFound:
                    continue  # someone else cleaned it
                except ValueError:
                    groups, image, record = [], None, None
                if state == "elsewhere" and not self._older_than(entry, groups, age):
                    continue
                if (isinstance(record, dict) and record.get("op") == "rename"
                        and not self._finish_rename(record)):
                    continue  # try again at the next mount
                settled = True
                for group in groups:
                    in_use = False
                    if isinstance(image, str):
                        try:
                            in_use = self._head(image, newest=True)[1] == group
                        except (NotFound, InvalidName):
                            in_use = False
                    if not in_use:
                        if referenced is None:
                            referenced = {g for _i, g in self._listing() if g}
                        in_use = group in referenced
                    if in_use:
                        continue
                    n, gone = self._delete_group(group)
                    if n:
                        removed += 1
                        log.info("store %s: removed segments %s/%s left by a crash", self.id,
                                 self.segment_container, group)
                    if not gone:
                        settled = False  # the marker stays: the next mount tries again
                if settled:
                    self._delete_quietly(self.segment_container, mname)
        return removed

    def _finish_rename(self, record: Mapping[str, Any]) -> bool:
        """A rename cut short between its copy and its DELETE: if the source and the target
        both hold the segment group, delete the source's manifest (plain DELETE), as the rename
        would have. False if that failed."""
        old, new, group = record.get("source"), record.get("image"), record.get("group")
        if not (isinstance(old, str) and isinstance(new, str) and isinstance(group, str)):
            return True
        try:
            if not self._copy_exists(new, group) or not self._copy_exists(old, group):
                return True
            self._call(f"{old}: DELETE (finish a rename)", "delete_object", self.container, old,
                       write=True)
            log.info("store %s: finished the rename %s -> %s cut short by a crash", self.id,
                     old, new)
        except NotFound:
            pass
        except (StoreError, ValueError) as e:
            log.warning("store %s: rename %s -> %s left by a crash: %s", self.id, old, new, e)
            return False
        self._forget(old)
        return True

    def _older_than(self, entry: Mapping[str, Any], groups: list[str], age: float) -> bool:
        newest = _iso_time(entry.get("last_modified"))
        for group in groups:
            for page in self._iter_container(self.segment_container, prefix=group + "/"):
                newest = max([newest, *(_iso_time(o.get("last_modified")) for o in page)])
        return time.time() - newest >= age

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
        ref = self.options.get("glance_reference")
        if ref:
            return f"swift+config://{ref}/{container}/{obj}"
        if self._url is None:
            raise BackendError(f"store {self.id}: not connected")
        u = urllib.parse.urlsplit(self._url)
        return f"swift+{u.scheme}://{u.netloc}{u.path.rstrip('/')}/{container}/{obj}"

    def usage(self) -> tuple[int, int] | None:
        main = self._call(f"container {self.container}: HEAD", "head_container", self.container)
        try:
            seg = self._call(f"container {self.segment_container}: HEAD", "head_container",
                             self.segment_container)
        except NotFound:
            seg = {}
        images = int(main.get("x-container-object-count", 0))
        main_bytes = int(main.get("x-container-bytes-used", 0))
        seg_bytes = int(seg.get("x-container-bytes-used", 0))
        # Swift counts an SLO manifest at its total size (listing override); RGW at the
        # manifest's own few bytes: only then do the segments add to the images' bytes.
        return images, main_bytes if main_bytes >= seg_bytes else main_bytes + seg_bytes

    def properties(self) -> dict[str, str]:
        props = {"auth_url": str(self._auth["auth_url"]), "auth_version":
                 self._auth["auth_version"], "user": str(self._auth["user"]),
                 "container": self.container, "segment_container": self.segment_container}
        if self._url:
            props["storage_url"] = self._url
        return props


def _import_client_here() -> None:
    """Import swiftclient in the thread that builds the store (the daemon's main thread), not
    in the worker thread that opens it. With the OpenStack libraries installed beside it
    (Debian's glance_store, cinder) swiftclient pulls in keystoneauth1, osprofiler,
    oslo.concurrency and so eventlet; eventlet 0.33 first imported in a non-main thread makes
    that thread impossible to join on Python 3.11, and the mount hung in ``open_stores``.
    Best effort: a missing swiftclient is reported by ``open()``."""
    try:
        import swiftclient.client  # noqa: F401
    except ImportError:
        pass


def _iso_time(value: Any) -> float:
    """Listing times: '2024-01-02T03:04:05.678900' (Swift) or '...05.678Z' (RGW), UTC."""
    if not isinstance(value, str) or not value:
        return 0.0
    try:
        dt = datetime.datetime.fromisoformat(value.rstrip("Z"))
    except ValueError:
        return 0.0
    return dt.replace(tzinfo=datetime.UTC).timestamp()
