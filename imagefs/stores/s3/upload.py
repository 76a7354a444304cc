"""Writing one S3 image: parts sent while the writer goes on, published in one step.

Writes arrive in order (no ``Capability.RANDOM_WRITE``: ``writer_spool.py`` spools non-sequential
writers and uploads the spool at close). An image smaller than one part is a single PUT at
commit, with its metadata. A larger one becomes a multipart upload to a hidden key
``<prefix>.imagefs-up-<owner-id>``; parts go up from a small thread pool while the writer goes
on. Commit completes the upload, then a server-side copy to the final key (with mtime, mode and
hashes as metadata, which S3 only accepts when an object is created) publishes the whole image
in one step, and the hidden object is deleted. The final key therefore never holds a partial
object, and a crash leaves only hidden keys that carry their owner's id.

Part sizes start at ``part_size`` (or what a known size needs to fit 9,000 parts) and double
every 1,000 parts, so any image up to S3's 5 TiB fits in 10,000 parts. Part buffers of all
uploads of the store together stay within ``upload_memory`` (``budget.py``): a part that does
not fit in what is left, or that would not fit ``upload_concurrency + 1`` times in the whole
budget, is buffered in an unlinked temporary file instead of RAM. Memory buffers are reused
from part to part (``BufferPool``) while the store has uploads running, and the writer's spool
is read straight into them (``write_from``).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from typing import IO, TYPE_CHECKING

from imagefs.stores.base import BackendError, ImageInfo, NoSpace, Upload, read_padded
from imagefs.stores.budget import BufferPool
from imagefs.stores.owners import new_owner_id
from imagefs.stores.s3.copy import copy
from imagefs.stores.s3.layout import MAX_PARTS, UPLOAD_TAG, base_part_size, part_size_for
from imagefs.stores.s3.multipart import (
    abort_multipart,
    complete,
    create_multipart,
    delete_key_quietly,
    put_small,
    upload_part,
)

if TYPE_CHECKING:
    from imagefs.stores.s3.store import S3Store

log = logging.getLogger(__name__)


class Part:
    """One part's bytes: in a pooled memory buffer when there is room, else in an unlinked
    temporary file."""

    def __init__(self, number: int, size: int, pool: BufferPool | None) -> None:
        """``pool``: where the part's memory buffer comes from (None: the part goes to a file)."""
        self.number = number
        self.size = size
        self.length = 0
        self._mem = pool.get(size) if pool is not None else None
        self._pool = pool if self._mem is not None else None
        self._file: IO[bytes] | None = tempfile.TemporaryFile() if self._mem is None else None

    def add(self, data: memoryview) -> int:
        """Append what fits; returns how many bytes were taken."""
        take = data[: self.size - self.length]
        if self._mem is not None:
            self._mem[self.length:self.length + len(take)] = take
        else:
            assert self._file is not None
            self._file.write(take)
        self.length += len(take)
        return len(take)

    def read_from(self, fd: int, offset: int, length: int,
                  feed: Callable[[memoryview], None]) -> int:
        """Append up to ``length`` bytes of file ``fd`` from ``offset`` (zeros past its end),
        read straight into the buffer, and ``feed`` them; returns how many were taken."""
        take = min(length, self.size - self.length)
        if self._mem is None:
            data = read_padded(fd, take, offset)
            assert self._file is not None
            self._file.write(data)
            feed(memoryview(data))
        else:
            view = memoryview(self._mem)[self.length:self.length + take]
            try:
                got = 0
                while got < take:
                    n = os.preadv(fd, [view[got:]], offset + got)
                    if n == 0:  # past the end of the file: a size set by truncate
                        view[got:] = bytes(take - got)
                        break
                    got += n
                feed(view)
            finally:
                view.release()  # the last part's buffer is cut to its length before it is sent
        self.length += take
        return take

    @property
    def full(self) -> bool:
        return self.length >= self.size

    def body(self) -> bytearray | IO[bytes]:
        if self._mem is not None:
            if len(self._mem) > self.length:  # the last part: botocore sends the whole buffer
                del self._mem[self.length:]
            return self._mem  # botocore takes a bytearray as it is: no second copy of the part
        assert self._file is not None
        self._file.seek(0)
        return self._file

    def release(self) -> None:
        if self._pool is not None:
            assert self._mem is not None
            self._pool.put(self._mem, self.size)
        self._pool = None
        self._mem = None
        if self._file is not None:
            self._file.close()
            self._file = None


class S3Upload(Upload):
    """A new image streaming into a hidden multipart upload (or one PUT if it stays small).

    ``write`` and ``commit`` hold ``_mutex`` while they run. ``abort`` may come from another
    thread while an abandoned ``write`` still runs (the bridge gives up on slow calls): it marks
    the upload dead first, which every wait in ``write`` checks, then takes the mutex, so no
    part or multipart upload is created after an abort.
    """

    def __init__(self, store: S3Store, name: str, size_hint: int | None) -> None:
        self.store = store
        self.name = name
        self.key = store.key(name)
        self.hidden = f"{store.prefix}{UPLOAD_TAG}{new_owner_id()}"
        self.pos = 0
        self.base_part = base_part_size(store.part_size, size_hint)
        self.part: Part | None = None
        self.upload_id: str | None = None
        self.etags: dict[int, str] = {}
        self.parts_made = 0
        self.pending: list[concurrent.futures.Future[None]] = []
        self.failed: BaseException | None = None
        self.finished = False
        self.dead = False
        self._slots = threading.Semaphore(store.upload_concurrency)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._mutex = threading.Lock()
        self._ended = False
        store.buffers.begin()

    def _end(self) -> None:
        """Once: the store's kept part buffers are freed when its last upload ends."""
        with self._lock:
            if self._ended:
                return
            self._ended = True
        self.store.buffers.end()

    def _what(self) -> str:
        return f"{self.store.id}/{self.name}"

    def _alive(self) -> None:
        if self.dead or self.finished:
            raise BackendError(f"{self._what()}: upload already finished")
        if self.failed is not None:
            raise BackendError(f"{self._what()}: part upload failed: {self.failed}")

    def _new_part(self) -> Part:
        self.parts_made += 1
        number = self.parts_made
        if number > MAX_PARTS:
            raise NoSpace(f"{self._what()}: image exceeds {MAX_PARTS} parts")
        size = part_size_for(self.base_part, number)
        return Part(number, size, self.store.part_pool(size))

    def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        self._append(offset, len(data), lambda part, done: part.add(view[done:]))

    def write_from(self, fd: int, offset: int, length: int,
                   feed: Callable[[memoryview], None]) -> None:
        """As ``write``, with the bytes read from ``fd`` straight into the part buffers."""
        self._append(offset, length,
                     lambda part, done: part.read_from(fd, offset + done, length - done, feed))

    def _append(self, offset: int, length: int, fill: Callable[[Part, int], int]) -> None:
        """Add ``length`` bytes at ``offset`` (the end so far): ``fill(part, done)`` puts
        what fits of them, from the ``done``-th on, into ``part`` and says how many."""
        with self._mutex:
            self._alive()
            if offset != self.pos:
                raise BackendError(f"{self._what()}: S3 uploads take writes in order "
                                   f"(got offset {offset}, expected {self.pos})")
            done = 0
            while done < length:
                self._alive()
                if self.part is None:
                    self.part = self._new_part()
                done += fill(self.part, done)
                if self.part.full:
                    part, self.part = self.part, None
                    self._send(part)
            self.pos += length

    def _send(self, part: Part) -> None:
        """Hand a full part to the pool; blocks while ``upload_concurrency`` parts are in flight.

        The wait is shorter than the caller's deadline, so a stalled backend surfaces here as
        an error instead of an abandoned thread.
        """
        try:
            if self.upload_id is None:
                self.upload_id = create_multipart(self.store, self.hidden, {})
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    self.store.upload_concurrency, thread_name_prefix=f"s3-{self.store.id}")
            deadline = time.monotonic() + self.store.timeout * 0.9
            while not self._slots.acquire(timeout=0.25):
                self._alive()
                if time.monotonic() > deadline:
                    raise BackendError(f"{self._what()}: part uploads stalled")
        except BaseException:
            part.release()
            raise
        self.pending.append(self._pool.submit(self._upload_part, part))

    def _upload_part(self, part: Part) -> None:
        try:
            if self.dead:
                return
            tag = upload_part(self.store, self.hidden, self.upload_id or "", part)
            with self._lock:
                self.etags[part.number] = tag
        except BaseException as e:
            self.failed = self.failed or e
            raise
        finally:
            part.release()
            self._slots.release()

    def _wait_parts(self) -> None:
        """Wait for the parts in flight, no longer than each could take with its retries."""
        _, late = concurrent.futures.wait(self.pending, timeout=self.store.part_deadline)
        if late:
            raise BackendError(f"{self._what()}: {len(late)} part upload(s) did not finish")
        self.pending = []
        self._alive()

    def flush(self) -> None:
        """Parts sent so far are stored; the tail stays buffered (S3 needs 5 MiB per part)."""
        with self._mutex:
            self._wait_parts()

    def commit(self, meta: Mapping[str, str]) -> ImageInfo:
        with self._mutex:
            self._alive()
            store = self.store
            try:
                if self.upload_id is None:
                    part = self.part or Part(1, 0, None)
                    self.part = None
                    info = put_small(store, self.name, part, meta)
                else:
                    if self.part is not None and self.part.length:
                        part, self.part = self.part, None
                        self._send(part)
                    self._wait_parts()
                    complete(store, self.hidden, self.upload_id, self.etags, self.pos)
                    self.upload_id = None
                    info = copy(store, self.hidden, self.key, meta, None, self.pos,
                                publishing=True)
                    delete_key_quietly(store, self.hidden)
            except BaseException:
                self._abort_in_background()
                raise
            self._close_pool()
            self.finished = True
            self._end()
            return info

    def _abort_in_background(self) -> None:
        """A failed commit reports at once; the clean-up runs in a thread of its own. Done
        inline it waited again for the parts that had just timed out, then for the abort and
        the delete, each with its retries: a stalled backend held the writer's close() in D
        state for about ten store timeouts. What it cannot remove, the next mount does."""
        self.dead = self.finished = True

        def clean_up() -> None:
            with self._mutex:
                try:
                    self._abort_locked()
                except Exception as e:
                    log.warning("%s: abort after a failed commit: %s (removed at the next "
                                "mount)", self._what(), e)
                finally:
                    self._end()

        threading.Thread(target=clean_up, name=f"s3-abort-{self.store.id}",
                         daemon=True).start()

    def _close_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def abort(self) -> None:
        if self.finished:  # committed, or a failed commit's clean-up is already under way
            return
        self.dead = True
        if not self._mutex.acquire(timeout=self.store.part_deadline):
            log.warning("%s: abort gave up waiting for a stuck writer; the upload is left "
                        "for the next mount's cleanup", self._what())
            return
        try:
            self._abort_locked()
        finally:
            self._mutex.release()

    def _abort_locked(self) -> None:
        self.dead = True
        self.finished = True
        if self.part is not None:
            self.part.release()
            self.part = None
        concurrent.futures.wait(self.pending, timeout=self.store.part_deadline)
        self.pending = []
        self._close_pool()
        self._end()
        if self.upload_id is not None:
            abort_multipart(self.store, self.hidden, self.upload_id)
            self.upload_id = None
        delete_key_quietly(self.store, self.hidden)
