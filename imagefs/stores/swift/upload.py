"""One upload: buffering, streaming into segment PUTs, and publishing with one PUT.

Writes arrive in order (no ``random_write``: ``writer.py`` spools otherwise). The first
``min(segment_size, 16 MiB)`` are buffered; an image that ends there is one plain PUT at
commit. Past that, the bytes stream into segment PUTs (``segments.py``); up to
``upload_concurrency`` of them are in flight. Buffered and queued bytes of all uploads of the
store together stay within ``upload_memory`` (``budget.py``; half for small images, half for
queued chunks): a small image that does not fit streams as an SLO, and a chunk waits for others
to be sent.

The SLO manifest is PUT at commit: the only moment the image appears; its answer must carry the
SLO ETag computed here, and a full HEAD (not our metadata) then checks the real ETag, size and
segment group. A manifest PUT that fails other than by a clean 4xx may still have been stored:
a HEAD decides (our group there: published); if it cannot, the segments and markers stay for
``cleanup_leftovers``. One lock per upload serialises write, the start of commit and abort (the
bridge abandons calls that overrun, so an old write may still run); an abort during commit
deletes nothing: commit owns that outcome.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import queue
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from imagefs.stores.base import (
    BackendError,
    ImageInfo,
    NoSpace,
    NotFound,
    StoreError,
    Upload,
    user_meta,
)
from imagefs.stores.owners import new_owner_id
from imagefs.stores.swift.layout import (
    OWN_META,
    Dlo,
    etag_of_segments,
    group_of,
    meta_headers,
    segment_name,
)
from imagefs.stores.swift.segments import END, Segment, send_segment, stop_all

if TYPE_CHECKING:
    from imagefs.stores.swift.store import SwiftStore

log = logging.getLogger(__name__)

MiB = 1 << 20
#: Largest image kept in memory and sent as one plain PUT.
SMALL_LIMIT = 16 * MiB


class SwiftUpload(Upload):
    """One upload. ``lock`` serialises write, commit's start and abort (the bridge abandons a
    call that overruns its deadline, so an old write may still run when abort or commit comes);
    ``state`` goes open → committing → published | failed, or open → aborted."""

    def __init__(self, store: SwiftStore, name: str, size_hint: int | None) -> None:
        self.store = store
        self.name = name
        self.uid = new_owner_id()
        self.group = group_of(name, self.uid)
        self.size = 0
        self.small: list[bytes] | None = []
        self.small_held = 0  # bytes of ``small`` taken from the store's memory budget
        self.small_limit = min(store.segment_size, SMALL_LIMIT)
        self.segments: list[Segment] = []
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
            raise BackendError(f"{self._what()}: upload busy for {self.store.timeout:g}s")

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
        self.store.journal.put_marker(self.uid, {"op": "upload", "image": self.name,
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

    def _new_segment(self) -> Segment:
        """A new segment and its PUT (called under ``lock``: abort never sees half of it)."""
        if self.dead:
            raise BackendError(f"{self._what()}: upload aborted")
        index = len(self.segments)
        if index >= self.store.max_segments:
            raise NoSpace(f"{self._what()}: more than {self.store.max_segments} segments "
                          f"(the server's limit); raise segment_size")
        seg = Segment(index, segment_name(self.group, index), self.store.segment_target(index),
                      self.store.memory)
        assert self.pool is not None
        self.segments.append(seg)
        seg.future = self.pool.submit(send_segment, self.store.client, self.store.segment_container,
                                      seg)
        return seg

    def _feed(self, view: memoryview) -> None:
        while view:
            seg = self.segments[-1] if self.segments else None
            if seg is None or seg.fed >= seg.target or seg.closed:
                if seg is not None:
                    self._put(seg, END)
                seg = self._new_segment()
            n = min(len(view), seg.target - seg.fed)
            if not self._put(seg, view[:n]):
                continue  # the segment was closed while idle: the bytes go to the next one
            seg.fed += n
            view = view[n:]

    def _put(self, seg: Segment, item: Any) -> bool:
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

    def _put_held(self, seg: Segment, item: Any, deadline: float) -> bool:
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
                    if item is END:
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
                                   f"progress for {self.store.timeout:g}s")
            time.sleep(0.005)

    def _finish_segments(self) -> None:
        if self.segments:
            self._put(self.segments[-1], END)
        for seg in self.segments:
            assert seg.future is not None
            try:
                seg.future.result(timeout=self.store.timeout)
            except concurrent.futures.TimeoutError:
                raise BackendError(f"{self._what()}: segment {seg.index} upload did not finish "
                                   f"within {self.store.timeout:g}s") from None
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
        headers = meta_headers({k: v for k, v in user_meta(meta).items()
                                 if not k.startswith("imagefs_")})
        old_group: str | None = None
        old_dlo: Dlo | None = None
        replace_uid: str | None = None
        try:
            self._check_failed()
            old_group, old_dlo = st.listing.group_of_existing(self.name)
            if old_group is not None and old_group != self.group:
                replace_uid = new_owner_id()
                st.journal.put_marker(replace_uid, {"op": "replace", "image": self.name,
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
                    st.journal.drop_marker(replace_uid)
            except Exception as e:
                log.warning("%s: clean-up after a failed commit: %s (the next mount "
                            "finishes it)", self._what(), e)

        self.dead = True
        threading.Thread(target=clean_up, name=f"swift-discard-{st.id}", daemon=True).start()

    def _after_publish(self, old_group: str | None, replace_uid: str | None,
                       old_dlo: Dlo | None = None) -> None:
        """The image is published: drop the markers and the replaced image's segments (an
        SLO's group, or a replaced DLO's segments, which would otherwise show as images)."""
        self.state = "published"
        st = self.store
        st.listing.forget(self.name)
        if self.pool is not None:
            self.pool.shutdown(wait=False)
        try:
            if self.marker:
                st.journal.drop_marker(self.uid)
            if replace_uid is not None and old_group is not None:
                st.journal.drop_group(old_group, replace_uid, exclude=self.name)
            if old_dlo is not None:
                st.journal.drop_dlo_segments(old_dlo, exclude=self.name)
        except StoreError as e:  # the next mount's clean-up finishes the job
            log.warning("%s: clean-up after publishing: %s", self._what(), e)

    def _unclear(self, err: StoreError) -> None:
        """The manifest (or object) PUT failed without a clean refusal: the server may have
        stored it anyway. Published if the name now holds our segment group; otherwise the
        outcome is unknown and ``err`` is raised."""
        if self.small is None:
            try:
                if self.store.listing.head(self.name, newest=True)[1] == self.group:
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
            return st.client.call(what, "put_object", st.container, self.name, *args,
                                  write=True, **kwargs)
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
        slo_etag = etag_of_segments(s.etag for s in self.segments)
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
            h = self.store.client.call(f"{self.name}: HEAD", "head_object", self.store.container,
                                       self.name, headers={"X-Newest": "true"})
        except NotFound as e:  # deleted at once by someone else
            raise BackendError(f"{e} right after publishing") from None
        parsed = self.store.listing.info(self.name, h)
        assert parsed is not None
        info, group, is_slo = parsed
        self.store.listing.remember_head(self.name, (info.version, info.size, group, None))
        if info.version != etag or (slo and group != self.group):
            raise BackendError(f"{self._what()}: replaced by another writer right after "
                               f"publishing (ETag {info.version}, ours {etag})")
        if info.size != size or is_slo != slo:
            raise BackendError(f"{self._what()}: published {info.size} bytes "
                               f"({'SLO' if is_slo else 'object'}), expected {size}")
        meta = {k: v for k, v in info.meta.items() if k not in OWN_META}
        return ImageInfo(name=info.name, size=info.size, mtime=info.mtime, mode=info.mode,
                         version=info.version, meta=meta)

    def abort(self) -> None:
        if self.state == "committing":
            return  # commit owns the outcome: its manifest PUT may be in flight
        if self.finished:
            return
        self.dead = True  # an abandoned write stops at its next chunk and lets go of the lock
        for seg in list(self.segments):
            seg.abort()
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
        stop_all(self.segments, self.pool, self.store.timeout)
        if not self.marker:
            return
        running = any(s.running for s in self.segments)
        started = [s.obj for s in self.segments
                   if s.future is None or not s.future.cancelled()]
        gone = self.store.journal.delete_group(self.group, started)[1]
        if gone and not running:
            self.store.journal.drop_marker(self.uid)
        else:
            log.warning("%s: abort left segments (%s); the marker stays for the clean-up at "
                        "the next mount", self._what(),
                        "a PUT still running" if running else "deletes failed")


