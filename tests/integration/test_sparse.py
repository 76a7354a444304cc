"""Big sparse images on the stores that keep holes (file, rbd): close() does not hash zeros.

``qemu-img create -f raw IMG 1T`` used to sit in close() hashing a terabyte of zeros (the
caller in D state, SIGTERM ignored). Now a close hashes at most ``hash.inline_max`` bytes that
did not stream through in order; the rest is hashed after publish, in the background, and
stored only for the version it read.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_common import MiB
from tests.mounting import IMAGEFS, daemon_pid

KINDS = ["file", "rbd"]


@pytest.fixture(params=KINDS)
def table(request: pytest.FixtureRequest) -> dict[str, Any]:
    return request.getfixturevalue(f"{request.param}_store_table")


def _xattr(path: Path, key: str) -> str | None:
    try:
        return os.getxattr(path, f"user.imagefs.{key}").decode()
    except OSError:
        return None


def test_a_terabyte_sparse_create_returns_and_is_left_unhashed(
        table: dict[str, Any], mount_factory: Any) -> None:
    m = mount_factory({"s": table}, hash={"background_max": "1GiB"})
    path = m.path("s", "big.raw")
    # The timeout only turns a hang into a failure; 1 TiB of hashing took 18+ minutes.
    r = subprocess.run(["qemu-img", "create", "-f", "raw", str(path), "1T"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert path.stat().st_size == 1 << 40
    assert _xattr(path, "os_hash_value") is None  # too big for the background: imagefs hash
    with open(path, "rb") as f:
        f.seek((1 << 40) - 4096)
        assert f.read() == bytes(4096)
    assert "hash.background_max" in m.log_text()


def test_sparse_images_get_their_hashes_after_publish(table: dict[str, Any],
                                                      mount_factory: Any) -> None:
    """Past inline_max the image is published first, hashed afterwards; the hashes are those
    of its bytes, holes included, and a replaced image never gets the old one's hashes."""
    m = mount_factory({"s": table}, hash={"inline_max": "1MiB"})
    path = m.path("s", "sparse.raw")
    subprocess.run(["truncate", "-s", "96M", str(path)], check=True, timeout=300)
    with open(path, "r+b") as f:
        f.seek(50 * MiB)
        f.write(b"\x01" * 4096)  # out of order, after a 50 MiB hole
    want = bytearray(96 * MiB)
    want[50 * MiB:50 * MiB + 4096] = b"\x01" * 4096
    digest = hashlib.sha512(want).hexdigest()
    deadline = time.monotonic() + 120
    while _xattr(path, "os_hash_value") != digest and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _xattr(path, "os_hash_value") == digest
    assert _xattr(path, "checksum") == hashlib.md5(want).hexdigest()
    r = subprocess.run([*IMAGEFS, "verify", str(path)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    # A fresh mount reads the hashes from the backend, not from this daemon's memory.
    m2 = mount_factory({"s": table}, cache={"disk_size": "0"})
    assert _xattr(m2.path("s", "sparse.raw"), "os_hash_value") == digest


def test_sigterm_ends_a_daemon_busy_in_a_long_close_in_bounded_time(
        file_store_table: dict[str, Any], mount_factory: Any, tmp_path: Path) -> None:
    """The old behaviour on purpose (hash the whole terabyte in close): SIGTERM gives the
    request ``mount.stop_timeout`` seconds, then aborts it; nothing is published and the
    caller gets an error instead of staying in D state."""
    m = mount_factory({"s": file_store_table}, hash={"inline_max": "2TiB"},
                      mount={"stop_timeout": 2})
    pid = daemon_pid(m)
    path = m.path("s", "huge.raw")
    writer = subprocess.Popen(["truncate", "-s", "1T", str(path)], stderr=subprocess.PIPE)
    store_dir = Path(file_store_table["path"])

    def hidden_sizes() -> list[int]:
        return [p.stat().st_size for p in store_dir.iterdir() if p.name.startswith(".")]

    deadline = time.monotonic() + 30
    while 1 << 40 not in hidden_sizes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert 1 << 40 in hidden_sizes(), "the hidden upload never reached 1 TiB"
    time.sleep(1)  # well inside the close's hashing, which takes many minutes
    assert writer.poll() is None
    os.kill(pid, signal.SIGTERM)
    # The timeouts only turn a hang into a failure (the old daemon never exited).
    writer.wait(timeout=120)
    assert writer.returncode != 0
    deadline = time.monotonic() + 120
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pid}"), "the daemon did not exit"
    log = m.log_text()
    assert "aborted" in log
    assert not list(Path(file_store_table["path"]).glob("huge.raw"))
    m2 = mount_factory({"s": file_store_table})
    assert os.listdir(m2.path("s")) == []
