"""Per-store counters of what the mount did, for ``imagefs status`` and Prometheus.

One process serves one mount, so the counters are module state: the FUSE layer, the reader and
the bridge bump them with one call each, without passing a stats object through every
constructor. They know no backend and no FUSE: a store is its id, an error its errno.

Every bump happens on the trio thread; ``snapshot`` may run in any thread (the status socket
and the metrics server answer from their own threads, so they still answer when the FUSE loop
is stuck). Reading ints and copying small dicts under the GIL gives a consistent enough view.

Cache counters count lookups per tier, each tier counting what reached it:
``memory`` is every block a read asked for (hit: in the memory LRU; miss: not there), ``disk``
every block that then had to be loaded, by a read or a prefetch (hit: from the disk cache;
miss: fetched from the backend). Stores read in place (file) use no block cache.
"""

from __future__ import annotations

import errno as errno_mod
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TypeVar

TIERS = ("memory", "disk")

B = TypeVar("B", bound="bytes | memoryview")


@dataclass
class StoreCounters:
    read_bytes: int = 0
    written_bytes: int = 0
    requests: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    hits: Counter[str] = field(default_factory=Counter)
    misses: Counter[str] = field(default_factory=Counter)


_stores: dict[str, StoreCounters] = {}
_started = time.time()


def _of(store_id: str) -> StoreCounters:
    c = _stores.get(store_id)
    if c is None:
        c = _stores[store_id] = StoreCounters()
    return c


def reset(store_ids: list[str]) -> None:
    """Start counting for a mount's stores (so stores with no traffic still report zeros)."""
    global _started
    _stores.clear()
    for sid in store_ids:
        _of(sid)
    _started = time.time()


def read(store_id: str, data: B) -> B:
    """Bytes served to a reader; returns ``data`` so the call wraps the read's result."""
    _of(store_id).read_bytes += len(data)
    return data


def written(store_id: str, n: int) -> int:
    """Bytes a writer handed over; returns ``n`` (what the write returns)."""
    _of(store_id).written_bytes += n
    return n


def request(store_id: str) -> None:
    """One backend call (a stat, a listing page, a ranged read of a run of blocks...)."""
    _of(store_id).requests += 1


def error(store_id: str, code: int) -> None:
    """A backend call that failed, as the errno the caller gets."""
    _of(store_id).errors[errno_mod.errorcode.get(code, str(code))] += 1


def cache(store_id: str, tier: str, hit: bool, n: int = 1) -> None:
    c = _of(store_id)
    (c.hits if hit else c.misses)[tier] += n


def _memory() -> dict[str, int]:
    """Resident and peak resident bytes of this process (VmRSS, VmHWM)."""
    out = {"rss_bytes": 0, "peak_rss_bytes": 0}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out["rss_bytes" if key == "VmRSS" else "peak_rss_bytes"] = \
                        int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def _row(c: StoreCounters) -> dict[str, Any]:
    return {"read_bytes": c.read_bytes, "written_bytes": c.written_bytes,
            "requests": c.requests, "errors": dict(c.errors),
            "cache": {t: {"hits": c.hits[t], "misses": c.misses[t]} for t in TIERS}}


def snapshot_empty() -> dict[str, Any]:
    """The counters of a store that did nothing yet."""
    return _row(StoreCounters())


def snapshot() -> dict[str, Any]:
    """Daemon facts and every store's counters, JSON-ready."""
    stores = {sid: _row(c) for sid, c in list(_stores.items())}
    return {"pid": os.getpid(), "started": _started,
            "uptime_seconds": round(time.time() - _started, 3), **_memory(), "stores": stores}
