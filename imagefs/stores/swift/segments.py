"""Segment PUTs: one chunked request per SLO segment, fed by the writer through a small queue.

A segment is one chunked PUT fed through a bounded queue while the writer goes on, so memory
per upload stays at a few chunks whatever ``segment_size`` is. Each queued chunk holds its
length of the store's memory budget (``budget.py``) until it is sent or drained. A segment
whose writer stalls is closed early (the next bytes start a new segment) so the proxy never
times the PUT out. The requests are made with ``http.client`` (swiftclient cannot stream a
queue): every socket call is bounded by the store timeout (a dead proxy ends in an error,
never a hang) and the returned ETag must be the md5 of the bytes sent (with
``cacert``/``insecure`` applied to TLS, as for swiftclient).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import queue
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

from imagefs.stores.base import BackendError
from imagefs.stores.budget import MemoryBudget
from imagefs.stores.swift.connection import Connections

#: Chunks waiting per segment PUT (each at most what one write() passed, 4 MiB from writer.py).
QUEUE_DEPTH = 4
#: Queue items that are not chunks: the body ends / the upload is aborted.
END = object()
ABORT = object()


def segment_target(index: int, segment_size: int, max_segments: int, max_object: int) -> int:
    """Segment sizes double every quarter of the server's segment limit (images beyond
    ``max_segments × segment_size`` still fit); memory does not depend on them."""
    tier = index // max(1, max_segments // 4)
    return min(segment_size << tier, max_object)


class Segment:
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
        """The PUT body. Ends at END, or early when the writer pauses for ``idle`` seconds."""
        while True:
            try:
                item = self.q.get(timeout=idle)
            except queue.Empty:
                with self.lock:
                    if self.q.empty():
                        self.closed = True  # the writer starts a new segment for what follows
                        return
                continue
            if item is END:
                return
            if item is ABORT or self.aborted:
                if item is not ABORT:
                    self.budget.give(len(item))
                raise BackendError("segment upload aborted")
            self.md5.update(item)
            self.sent += len(item)
            try:
                yield item
            finally:
                self.budget.give(len(item))

    def abort(self) -> None:
        """Close the segment and tell its PUT to stop (at once if the queue has room, else at
        its next chunk, which sees ``aborted``)."""
        self.aborted = True
        with self.lock:
            self.closed = True
            try:
                self.q.put_nowait(ABORT)
            except queue.Full:
                pass

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

    @property
    def running(self) -> bool:
        return self.future is not None and not self.future.done()


def stop_all(segments: list[Segment], pool: concurrent.futures.ThreadPoolExecutor | None,
             timeout: float) -> None:
    """Stop every segment PUT of an upload: those not started never start, each running one
    is told to stop and waited for (``timeout`` for all of them), and the memory of what no
    PUT will send is given back (a PUT still running drains its own queue when it ends)."""
    for seg in list(segments):
        seg.abort()
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + timeout
    for seg in segments:
        if seg.future is not None:
            try:
                seg.future.result(timeout=max(0.0, deadline - time.monotonic()))
            except BaseException:
                pass
    for seg in segments:
        if seg.future is None or seg.future.done():
            seg.drain()


def send_segment(client: Connections, container: str, seg: Segment) -> None:
    """One chunked PUT of ``seg`` (runs in an upload's pool thread)."""
    if client.url is None or client.token is None:
        raise BackendError(f"store {client.store_id}: not authenticated")
    url = urllib.parse.urlsplit(client.url)
    conn = (http.client.HTTPSConnection(url.hostname or "", url.port, timeout=client.timeout,
                                        context=client.ssl)
            if url.scheme == "https" else
            http.client.HTTPConnection(url.hostname or "", url.port, timeout=client.timeout))
    path = (url.path.rstrip("/") + "/" + urllib.parse.quote(container, safe="")
            + "/" + urllib.parse.quote(seg.obj, safe="/"))
    what = f"segment {seg.obj}: PUT"
    idle = max(0.5, min(20.0, client.timeout / 2))
    try:
        _send_on(client, conn, path, what, seg, idle)
    finally:
        if seg.aborted:  # nobody will send what is still queued
            seg.drain()


def _send_on(client: Connections, conn: http.client.HTTPConnection, path: str, what: str,
             seg: Segment, idle: float) -> None:
    try:
        try:
            conn.putrequest("PUT", path, skip_accept_encoding=True)
            conn.putheader("X-Auth-Token", client.token or "")
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
            raise client.socket_error(what, e) from None
    finally:
        conn.close()
    if resp.status == 401:
        client.reauthenticate()
    if not 200 <= resp.status < 300:
        err = client.ClientException(what, http_status=resp.status, http_reason=resp.reason)
        raise client.error(err, what, write=True)
    etag = (resp.getheader("Etag") or "").strip('"')
    if etag != seg.md5.hexdigest():
        raise BackendError(f"store {client.store_id}: {what}: ETag {etag!r} does not match the "
                           f"bytes sent ({seg.md5.hexdigest()})")
    seg.etag = etag
