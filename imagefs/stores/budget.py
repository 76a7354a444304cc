"""A byte budget shared by every upload of one store.

Each upload's own buffers are bounded, but a hypervisor host may write many images at once; a
per-upload bound alone would let memory grow with the number of writers. Stores take buffer
memory from one ``MemoryBudget`` per store (sized by its ``upload_memory`` option), so the total
stays bounded by configuration whatever the number of uploads. Callers that have somewhere else
to put the bytes (a temporary file) use ``try_take``; callers that must hold them in memory use
``take``, which waits, with a deadline, for other uploads to give bytes back.
"""

from __future__ import annotations

import threading
import time

from imagefs.stores.base import BackendError


class MemoryBudget:
    """Thread-safe counter of buffer bytes in use, never above ``limit``."""

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.what = what
        self.used = 0
        #: Highest ``used`` seen: what tests and ``status`` can check against ``limit``.
        self.peak = 0
        #: How many ``try_take`` calls found no room (their caller used a file instead).
        self.refused = 0
        self._cond = threading.Condition()

    def _grant(self, n: int) -> None:
        self.used += n
        self.peak = max(self.peak, self.used)

    def try_take(self, n: int) -> bool:
        """Take ``n`` bytes if they fit now; never waits."""
        with self._cond:
            if self.used + n <= self.limit:
                self._grant(n)
                return True
            self.refused += 1
            return False

    def take(self, n: int, timeout: float) -> None:
        """Take ``n`` bytes, waiting up to ``timeout`` s for others to give some back.

        A request larger than the whole budget is granted alone once nothing else is held: it
        cannot be split by the budget, and refusing it forever would hang its writer.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.used and self.used + n > self.limit:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BackendError(f"{self.what}: upload memory ({self.limit} bytes) still "
                                       f"in use after {timeout:g}s")
                self._cond.wait(left)
            self._grant(n)

    def give(self, n: int) -> None:
        """Return bytes taken earlier."""
        if n <= 0:
            return
        with self._cond:
            self.used = max(0, self.used - n)
            self._cond.notify_all()


class BufferPool:
    """Part buffers of one size, kept for the next part while a store has uploads running.

    A new 8 MiB part buffer costs a page fault and a zeroed page per 4 KiB when it is first
    filled, and the S3 write path was CPU-bound: a fifth of the daemon's kernel time went to
    faulting in fresh buffers. Kept buffers stay charged to ``budget`` (at most ``keep`` of
    them), so memory stays within the store's ``upload_memory``; when the last upload ends
    they are freed, so an idle mount holds none.
    """

    def __init__(self, budget: MemoryBudget, keep: int) -> None:
        self.budget = budget
        self.keep = keep
        self._free: list[bytearray] = []
        self._active = 0
        self._lock = threading.Lock()

    def begin(self) -> None:
        """An upload starts: buffers it gives back are kept for the next part."""
        with self._lock:
            self._active += 1

    def end(self) -> None:
        """An upload ended (once per ``begin``); the last one frees the kept buffers."""
        with self._lock:
            self._active = max(0, self._active - 1)
            if self._active:
                return
            freed, self._free = self._free, []
        self.budget.give(sum(len(b) for b in freed))

    def get(self, size: int) -> bytearray | None:
        """A buffer of ``size`` bytes charged to the budget (contents undefined), or None if
        the budget has no room for it now."""
        with self._lock:
            for i, buf in enumerate(self._free):
                if len(buf) == size:
                    return self._free.pop(i)
        if not self.budget.try_take(size):
            return None
        return bytearray(size)

    def put(self, buf: bytearray, charged: int) -> None:
        """Give back a buffer from ``get`` (``charged``: the size it was taken with; a buffer
        cut short, or one given back after the uploads ended, is freed)."""
        with self._lock:
            if len(buf) == charged and self._active and len(self._free) < self.keep:
                self._free.append(buf)
                return
        self.budget.give(charged)

    @property
    def kept(self) -> int:
        """Bytes held by kept buffers."""
        with self._lock:
            return sum(len(b) for b in self._free)
