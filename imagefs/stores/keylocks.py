"""One lock per key, made on first use and forgotten once free, for work that one thread of a
store must do for a key while others wanting the same key wait (a Swift segment map, a Cinder
read attachment) and unrelated keys never wait for each other."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Hashable, Iterator


class KeyLocks:
    def __init__(self, guard: threading.Lock) -> None:
        """``guard``: the lock that protects the owner's own tables (held only briefly)."""
        self._guard = guard
        self._locks: dict[Hashable, threading.Lock] = {}

    @contextlib.contextmanager
    def holding(self, key: Hashable, timeout: float,
                busy: Callable[[], BaseException]) -> Iterator[None]:
        """Hold ``key``'s lock; ``busy()`` is raised if it is not free within ``timeout``.
        Callers look again for what they came for once inside: the holder before them may
        have made it."""
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        if not lock.acquire(timeout=timeout):
            raise busy()
        try:
            yield
        finally:
            lock.release()
            with self._guard:
                if self._locks.get(key) is lock and not lock.locked():
                    del self._locks[key]
