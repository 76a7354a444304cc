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
