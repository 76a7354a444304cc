"""Shared fixtures: real backends (tests.backends), store tables per kind, and mounts."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.backends.fixtures import *  # noqa: F403
from tests.kinds.cinder import *  # noqa: F403
from tests.kinds.file import *  # noqa: F403
from tests.kinds.rbd import *  # noqa: F403
from tests.kinds.s3 import *  # noqa: F403
from tests.kinds.swift import *  # noqa: F403
from tests.mounting import Mount, mount, unmount


@pytest.fixture
def mount_factory(tmp_path: Path, request: pytest.FixtureRequest
                  ) -> Iterator[Callable[..., Mount]]:
    """``mount_factory({"id": table, ...}, cache=..., options=[...])`` → a live Mount.

    Every mount is unmounted at teardown; if the test failed, the daemon's log is printed.
    """
    made: list[Mount] = []

    def make(stores: dict[str, dict[str, Any]], **kw: Any) -> Mount:
        m = mount(tmp_path / f"m{len(made)}", stores, **kw)
        made.append(m)
        return m

    yield make
    failed = getattr(request.node, "rep_call", None)
    for m in made:
        unmount(m)
        if failed is not None and failed.failed:
            print(f"--- imagefs log {m.log} ---\n{m.log_text()[-6000:]}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    rep = yield
    setattr(item, "rep_" + rep.when, rep)
    return rep


ALL_KINDS = ["file", "s3", "rbd", "swift", "rgw_swift", "cinder"]
_DEFINED = set(globals())
# A kind runs the common tests once its module in tests/kinds exports ``<kind>_store_table``.
STORE_KINDS = [k for k in ALL_KINDS if f"{k}_store_table" in _DEFINED]

# The multi-store acceptance tests need every store type in one mount.
collect_ignore = ([] if {"s3", "rbd", "swift"} <= set(STORE_KINDS)
                  else ["integration/test_multistore.py"])


@pytest.fixture(params=STORE_KINDS)
def store_table(request: pytest.FixtureRequest) -> dict[str, Any]:
    """A writable store's config table, once per kind: the common tests run on each."""
    return request.getfixturevalue(f"{request.param}_store_table")


#: The FUSE control file system: imagefs mounts it to tune its connections when the host has
#: not (systemd does at boot; a bare container does not). Tests leave the host as they found it.
_FUSECTL = Path("/sys/fs/fuse/connections")
_fusectl_was_mounted = os.path.ismount(_FUSECTL)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _fusectl_was_mounted and os.path.ismount(_FUSECTL) and not any(_FUSECTL.iterdir()):
        subprocess.run(["umount", str(_FUSECTL)], capture_output=True, check=False)
