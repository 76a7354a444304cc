"""Real backends (Ceph, Swift, nginx) for integration tests and for running by hand.

Tests get them through the fixtures in ``fixtures.py``; ``python -m tests.backends up`` runs
them by hand. This module knows the set: which backends exist and how to make one, starting
several in parallel (they are independent, and start-up is mostly waiting), and the state
file that lets ``env``/``down`` (or a test run, see fixtures.py) use a set started elsewhere.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.backends.ceph import CephCluster, CephInfo
from tests.backends.common import Backend, log
from tests.backends.nginx import NginxInfo, NginxServer
from tests.backends.swift import SwiftCluster, SwiftInfo

NAMES = ("ceph", "ceph2", "swift", "nginx")
STATE_FILE = "state.json"
INFO_TYPES: dict[str, type] = {
    "ceph": CephInfo,
    "ceph2": CephInfo,
    "swift": SwiftInfo,
    "nginx": NginxInfo,
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
    raise ValueError(f"unknown backend {name!r}; known: {', '.join(NAMES)}")


def packages(name: str) -> str:
    """Debian packages backend *name* needs (for 'how to get it' messages)."""
    return make(name, Path("/nonexistent")).packages


def start_many(backends: Sequence[Backend]) -> dict[str, BaseException]:
    """Start *backends* in parallel; returns the errors of those that failed, by name."""
    t0 = time.monotonic()
    errors: dict[str, BaseException] = {}
    with ThreadPoolExecutor(max_workers=max(1, len(backends))) as pool:
        futures = {b.name: pool.submit(b.start) for b in backends}
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
