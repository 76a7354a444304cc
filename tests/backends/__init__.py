"""Real backends (Ceph, Swift, nginx, Cinder) for integration tests and for running by hand.

Tests get them through the fixtures in ``fixtures.py``; ``python -m tests.backends up`` runs
them by hand. This module knows the set: which backends exist and how to make one, starting
several in parallel (start-up is mostly waiting; a backend that runs on another, Cinder on
Ceph, waits for it inside its own start-up), and the state file that lets ``env``/``down``
(or a test run, see fixtures.py) use a set started elsewhere.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.backends import common
from tests.backends.ceph import CephCluster, CephInfo
from tests.backends.cinder import CinderCluster, CinderInfo
from tests.backends.common import Backend, log
from tests.backends.nginx import NginxInfo, NginxServer
from tests.backends.swift import SwiftCluster, SwiftInfo

NAMES = ("ceph", "ceph2", "swift", "nginx", "cinder")
STATE_FILE = "state.json"
INFO_TYPES: dict[str, type] = {
    "ceph": CephInfo,
    "ceph2": CephInfo,
    "swift": SwiftInfo,
    "nginx": NginxInfo,
    "cinder": CinderInfo,
}


def make(name: str, root: Path, objectstore: str | None = None) -> Backend:
    """A not yet started backend *name* in ``root/name``.

    Ceph's object store comes from *objectstore*, else ``IMAGEFS_CEPH_OBJECTSTORE``, else
    memstore (fastest; ``bluestore`` keeps OSD data out of RAM).
    """
    store = objectstore or os.environ.get("IMAGEFS_CEPH_OBJECTSTORE") or "memstore"
    directory = root / name
    if name == "ceph":
        return CephCluster(directory, "ceph", rgw=True, objectstore=store)
    if name == "ceph2":  # a second cluster on other ports, for cross-cluster tests; no RGW
        return CephCluster(directory, "ceph2", rgw=False, objectstore=store)
    if name == "swift":
        return SwiftCluster(directory)
    if name == "nginx":
        return NginxServer(directory)
    if name == "cinder":  # on the "ceph" cluster: see needs()
        return CinderCluster(directory)
    raise ValueError(f"unknown backend {name!r}; known: {', '.join(NAMES)}")


def needs(name: str) -> tuple[str, ...]:
    """The backends backend *name* runs on (they must be started too, and first)."""
    return make(name, Path("/nonexistent")).needs


def with_needs(names: set[str]) -> set[str]:
    """*names* plus every backend they run on, directly or not."""
    out: set[str] = set()
    todo = list(names)
    while todo:
        n = todo.pop()
        if n not in out:
            out.add(n)
            todo.extend(needs(n))
    return out


def stop_order(backends: Sequence[Backend]) -> list[list[Backend]]:
    """Groups to stop one after the other, each in parallel: backends that run on others
    first (Cinder removes its pool from Ceph on the way out), then the rest."""
    first = [b for b in backends if b.needs]
    rest = [b for b in backends if not b.needs]
    return [g for g in (first, rest) if g]


def packages(name: str) -> str:
    """Debian packages backend *name* needs (for 'how to get it' messages)."""
    return make(name, Path("/nonexistent")).packages


def start_many(backends: Sequence[Backend]) -> dict[str, BaseException]:
    """Start *backends* in parallel; returns the errors of those that failed, by name.

    One that needs another of the set gets a ``resolve`` that waits for it (all run in
    threads of their own, so the wait cannot starve the pool).
    """
    t0 = time.monotonic()
    errors: dict[str, BaseException] = {}
    by_name = {b.name: b for b in backends}
    futures: dict[str, Future[None]] = {}
    submitted = threading.Event()

    def resolve(dep: str) -> Any:
        if dep not in by_name:
            raise common.BackendError(f"needs backend {dep!r}: start it in the same set")
        submitted.wait()
        futures[dep].result()
        return by_name[dep].info

    with ThreadPoolExecutor(max_workers=max(1, len(backends))) as pool:
        for b in backends:
            if b.needs:
                b.resolve = resolve
            futures[b.name] = pool.submit(b.start)
        submitted.set()
        for name, fut in futures.items():
            if (e := fut.exception()) is not None:
                errors[name] = e
    ok = [b.name for b in backends if b.name not in errors]
    log(f"{', '.join(ok) or 'nothing'} up in {time.monotonic() - t0:.1f}s (in parallel)")
    return errors


def write_state(root: Path, backends: Sequence[Backend], owner: str) -> Path:
    """Record a running set in ``root/state.json`` (for ``env``, ``down`` and reuse)."""
    state = {"owner": owner, "backends": {b.name: b.state() for b in backends}}
    path = root / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)
    return path


def read_state(root: Path) -> dict[str, Any]:
    return json.loads((root / STATE_FILE).read_text())


def info_from_state(name: str, entry: dict[str, Any]) -> Any:
    """The fixture object for backend *name* rebuilt from its state-file entry."""
    fields = dict(entry["info"])
    for key in ("dir", "root"):
        if key in fields:
            fields[key] = Path(fields[key])
    return INFO_TYPES[name](**fields)
