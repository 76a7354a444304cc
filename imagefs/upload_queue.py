"""Ordered write-behind for one upload: a write returns once its bytes are queued, and the
store write and the hashing of each queued write run in two background stages at once.

Why: written straight through, every FUSE write paid the backend write and the sha512 + md5
of its bytes one after the other before ``cp`` could send the next (1 MiB each: ~1.5 ms of
librbd plus ~1.3 ms of hashing), so ``cp`` to RBD ran at 0.40 of librbd's speed. Queued, the
next write is received while the previous one is written and hashed, and the two overlap.

Nothing is lost or reordered:

* one task writes the queue to the store strictly in order, one task hashes it in order;
* the first failure of either stage is kept for good: every later ``submit``, ``drain`` and
  ``check`` raises it, so the writer becomes LOST and never publishes (``DirectWriter``
  drains before it reads, truncates, syncs or publishes);
* queued bytes count against a mount-wide :class:`Budget` (``cache.max_write_behind``); a
  write that finds no room in it waits for this upload's own queue to empty and is then
  written in the caller's turn, so memory stays bounded however many files are written.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import trio

from imagefs import bridge
from imagefs.stores.base import Store

log = logging.getLogger(__name__)

#: The most bytes one store call writes when queued writes are contiguous: fewer, larger
#: backend writes (librbd: one 4 MiB write costs little more than one of 1 MiB).
COALESCE = 4 << 20


class Budget:
    """Bytes queued for write-behind by every writer of a mount; never waits (see ``take``)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0

    def take(self, n: int) -> bool:
        """Reserve ``n`` bytes if they fit; False leaves the caller to write inline."""
        if self.used + n > self.max_bytes:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


@dataclass
class _Item:
    offset: int
    data: bytes
    #: Zeros hashed before ``data`` (a hole left behind by a write past the end); None: the
    #: hasher does not see this write (out of order, ``DirectWriter`` hashes at publish).
    gap: int | None
    #: Stages still to see it (write, and hash unless ``gap`` is None).
    left: int = 0
    #: Its bytes went back to the budget (done, or dropped after a failure).
    freed: bool = False


class UploadQueue:
    """The queue of one upload. ``write(offset, data)`` and ``hash(gap, data)`` are blocking
    calls run in threads: the first under the store's deadline, the second locally."""

    def __init__(self, store: Store, write: Callable[[int, bytes], None],
                 hash: Callable[[int, bytes], None], budget: Budget,
                 nursery: trio.Nursery) -> None:
        self.store = store
        self._write = write
        self._hash = hash
        self.budget = budget
        self.nursery = nursery
        self._to_write: deque[_Item] = deque()
        self._to_hash: deque[_Item] = deque()
        self._queued = 0  # bytes taken from the budget, not yet through both stages
        self._writing = self._hashing = False
        self._progress = trio.Event()
        self.error: BaseException | None = None

    # ---------------------------------------------------------------- the writer's side
    def check(self) -> None:
        """Raise the first background failure, if any."""
        if self.error is not None:
            raise self.error

    async def submit(self, offset: int, data: bytes, gap: int | None) -> None:
        """Queue one write (and its hashing when ``gap`` is not None)."""
        self.check()
        if not self.budget.take(len(data)):
            await self.drain()
            try:
                await bridge.call(self.store, self._write, offset, data)
                if gap is not None:
                    await bridge.local(self._hash, gap, data)
            except BaseException as e:
                self._fail(e, [])
                raise
            return
        item = _Item(offset, data, gap, left=1 if gap is None else 2)
        self._queued += len(data)
        self._to_write.append(item)
        if gap is not None:
            self._to_hash.append(item)
        self._kick()

    async def drain(self) -> None:
        """Wait until everything queued went through both stages; raise the first failure."""
        while self._queued and self.error is None:
            await self._wait()
        self.check()

    async def settle(self) -> None:
        """Wait for the stages to stop, whatever they hit (before the upload is aborted)."""
        self._drop_queue()
        while self._writing or self._hashing:
            await self._wait()

    # ---------------------------------------------------------------- the stages
    def _kick(self) -> None:
        if self._to_write and not self._writing:
            self._writing = True
            self.nursery.start_soon(self._run_writes)
        if self._to_hash and not self._hashing:
            self._hashing = True
            self.nursery.start_soon(self._run_hashes)

    async def _run_writes(self) -> None:
        batch: list[_Item] = []
        try:
            while self._to_write and self.error is None:
                batch = self._contiguous()
                data = batch[0].data if len(batch) == 1 else b"".join(i.data for i in batch)
                await bridge.call(self.store, self._write, batch[0].offset, data)
                for item in batch:
                    self._done(item)
                batch = []
        except BaseException as e:
            self._fail(e, batch)
            if not isinstance(e, Exception):
                raise
        finally:
            self._writing = False
            self._wake()

    async def _run_hashes(self) -> None:
        item: _Item | None = None
        try:
            while self._to_hash and self.error is None:
                item = self._to_hash.popleft()
                assert item.gap is not None
                await bridge.local(self._hash, item.gap, item.data)
                self._done(item)
                item = None
        except BaseException as e:
            self._fail(e, [] if item is None else [item])
            if not isinstance(e, Exception):
                raise
        finally:
            self._hashing = False
            self._wake()

    def _contiguous(self) -> list[_Item]:
        """The next queued writes that follow one another, up to ``COALESCE`` bytes."""
        batch = [self._to_write.popleft()]
        end, size = batch[0].offset + len(batch[0].data), len(batch[0].data)
        while (self._to_write and self._to_write[0].offset == end
               and size + len(self._to_write[0].data) <= COALESCE):
            item = self._to_write.popleft()
            batch.append(item)
            end += len(item.data)
            size += len(item.data)
        return batch

    def _done(self, item: _Item) -> None:
        item.left -= 1
        if item.left == 0:
            self._free(item)
        self._wake()

    def _fail(self, e: BaseException, in_flight: list[_Item]) -> None:
        if self.error is None:
            self.error = e if isinstance(e, Exception) else RuntimeError(
                f"{self.store.id}: write-behind stopped: {e!r}")
            log.debug("store %s: write-behind failed: %s", self.store.id, e)
        for item in in_flight:
            self._free(item)
        self._drop_queue()

    def _drop_queue(self) -> None:
        """Items no stage will take any more give their budget back."""
        for item in (*self._to_write, *self._to_hash):
            self._free(item)
        self._to_write.clear()
        self._to_hash.clear()

    def _free(self, item: _Item) -> None:
        if not item.freed:
            item.freed = True
            self._queued -= len(item.data)
            self.budget.give(len(item.data))

    def _wake(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    async def _wait(self) -> None:
        await self._progress.wait()
