"""The one place where the trio side calls blocking store code.

Every store call runs in a worker thread, limited per store, under a deadline. Nothing blocking
may run on the trio thread: one blocking call would freeze every process using the mount. A
deadline that passes raises ``BackendError`` (EIO for the caller); the abandoned thread finishes
in the background and its result is dropped.
"""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from imagefs import stats
from imagefs.errors import errno_of
from imagefs.stores.base import BackendError, Store

T = TypeVar("T")

_limiters: dict[int, trio.CapacityLimiter] = {}


def limiter_for(store: Store) -> trio.CapacityLimiter:
    """Per-store thread limit, created on first use (limiters belong to the running trio loop)."""
    lim = _limiters.get(id(store))
    if lim is None:
        n = store.cfg.concurrency or store.default_concurrency
        lim = _limiters[id(store)] = trio.CapacityLimiter(n)
    return lim


async def call(store: Store, fn: Callable[..., T], *args: Any, timeout: float | None = None,
               **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` for ``store`` in a thread, bounded by the store's timeout."""
    deadline = store.timeout if timeout is None else timeout
    bound = functools.partial(fn, *args, **kwargs) if kwargs else functools.partial(fn, *args)
    stats.request(store.id)
    with trio.move_on_after(deadline) as scope:
        try:
            return await trio.to_thread.run_sync(bound, limiter=limiter_for(store),
                                                 abandon_on_cancel=True)
        except Exception as e:
            stats.error(store.id, errno_of(e))
            raise
    if scope.cancelled_caught:
        stats.error(store.id, errno.EIO)
        # Store methods take the image name first: the log line then names the image too.
        image = f" {args[0]}" if args and isinstance(args[0], str) else ""
        raise BackendError(f"store {store.id}: {getattr(fn, '__name__', 'call')}{image} took "
                           f"longer than {deadline:g}s")
    raise AssertionError("unreachable")


async def local(fn: Callable[..., T], *args: Any,
                limiter: trio.CapacityLimiter | None = None) -> T:
    """Run local blocking I/O (spool files, disk cache) off the trio thread."""
    return await trio.to_thread.run_sync(functools.partial(fn, *args), limiter=limiter)
