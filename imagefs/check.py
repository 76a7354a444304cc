"""``imagefs check-config CONFIG [--connect]``: is this config good, and can each store be reached?

Validation is ``config.load``, exactly what ``mount`` does (exit 2 with the file and key). With
``--connect`` every store is opened and asked for one listing page, all in parallel, each within
its own ``timeout``: what ``mount`` would need, without mounting. It changes only what opening
a store changes (a writable Swift store creates its missing containers, as a mount would);
crash leftovers are not cleaned, unlike a mount. One line per store, ok or the reason.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from dataclasses import dataclass

from imagefs import stores as registry
from imagefs.config import Config, StoreConfig

#: Images taken from the first listing: one page of the paged backends (S3 lists 1000 keys).
PAGE = 1000


@dataclass(frozen=True)
class Result:
    store: StoreConfig
    ok: bool
    message: str


def _probe(sc: StoreConfig) -> str:
    store = registry.build(sc)
    store.open()
    try:
        n = sum(1 for _ in itertools.islice(store.list(), PAGE))
    finally:
        with contextlib.suppress(Exception):
            store.close()
    return f"{n}{'+' if n == PAGE else ''} image(s) in the first listing page"


def connect(cfg: Config) -> list[Result]:
    """Open and list every store of ``cfg``; never raises for a store's failure.

    Daemon threads, not a pool: a store that hangs past its deadline must not keep the
    command from exiting."""
    outcome: dict[str, Result] = {}

    def run(sc: StoreConfig) -> None:
        try:
            outcome[sc.id] = Result(sc, True, _probe(sc))
        except Exception as e:
            outcome[sc.id] = Result(sc, False, str(e) or type(e).__name__)

    threads = [(sc, threading.Thread(target=run, args=(sc,), daemon=True))
               for sc in cfg.stores]
    start = time.monotonic()
    for _, t in threads:
        t.start()
    for sc, t in threads:
        t.join(max(0.0, start + sc.timeout + 5 - time.monotonic()))
    return [outcome.get(sc.id) or Result(sc, False, f"no answer within {sc.timeout + 5:g}s")
            for sc in cfg.stores]


def report(cfg: Config, results: list[Result] | None) -> str:
    lines = [f"{cfg.path}: valid; {len(cfg.stores)} store(s)"]
    if results is None:
        lines += [f"  {sc.id} ({sc.type})" for sc in cfg.stores]
    else:
        lines += [f"  {r.store.id} ({r.store.type}): "
                  + ("ok, " if r.ok else "error: ") + r.message for r in results]
    return "\n".join(lines)
