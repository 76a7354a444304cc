"""Benchmark the swift store: imagefs through the mount vs python-swiftclient on the same object.

    sudo .venv/bin/python -m tests.bench.bench_swift [SIZE_MIB] [--no-rgw]

One run, side by side on this machine's harness backends (OpenStack Swift with tempauth, and
Ceph RGW's Swift API unless ``--no-rgw``): the same random file is written and read with
``dd bs=4M`` through imagefs, with swiftclient's ``Connection.put_object``/``get_object`` (one
streamed request each, no segments) and, if installed, the ``swift`` CLI (``upload``/
``download``, its default settings). Page caches are dropped before every step; "warm" reads hit
imagefs's own block cache. Ratios are imagefs's speed over swiftclient's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.backends import make, start_many
from tests.backends.fixtures import swift_connection
from tests.bench.common import MiB, dd, drop_caches, report, timed
from tests.mounting import mount, unmount

CHUNK = 4 * MiB
#: The swift CLI: on PATH, else next to this interpreter (the venv's, when run as .venv/bin/python).
SWIFT_CLI = shutil.which("swift") or shutil.which("swift", path=str(Path(sys.executable).parent))


def sc_upload(conn: Any, container: str, name: str, src: Path) -> None:
    with open(src, "rb") as f:
        conn.put_object(container, name, f, content_length=src.stat().st_size,
                        chunk_size=CHUNK)


def sc_download(conn: Any, container: str, name: str) -> None:
    _, body = conn.get_object(container, name, resp_chunk_size=CHUNK)
    for _chunk in body:
        pass


def cli(auth: str, user: str, key: str, *args: str, cwd: Path) -> None:
    assert SWIFT_CLI is not None
    subprocess.run([SWIFT_CLI, "-A", auth, "-U", user, "-K", key, *args], check=True, cwd=cwd,
                   stdout=subprocess.DEVNULL)


def bench_one(title: str, auth: str, user: str, key: str, src: Path, work: Path) -> None:
    size = src.stat().st_size
    container = f"bench-{title.split()[0].lower()}"
    key_file = work / f"{container}.key"
    key_file.write_text(key)
    key_file.chmod(0o600)
    conn = swift_connection(auth, user, key)
    conn.put_container(container)
    m = mount(work / f"m-{container}", {
        "s": {"type": "swift", "auth_url": auth, "auth_version": "1", "user": user,
              "key_file": str(key_file), "container": container},
    }, cache={"memory_size": "256MiB", "disk_size": "2GiB",
              "block_size": os.environ.get("BENCH_BLOCK_SIZE", "1MiB")}, debug=False)
    rows: list[tuple[str, float, str]] = []
    sc_w, sc_r = "write: swiftclient put_object", "read: swiftclient get_object"
    try:
        drop_caches()
        rows.append((sc_w, timed(lambda: sc_upload(conn, container, "sc.raw", src)), ""))
        drop_caches()
        rows.append(("write: dd into imagefs (SLO, 100 MiB segments)",
                     timed(lambda: dd(src, m.path("s", "fs.raw"), extra=("conv=fsync",))), sc_w))
        if SWIFT_CLI:
            drop_caches()
            rows.append(("write: swift upload (CLI)", timed(lambda: cli(
                auth, user, key, "upload", "--object-name", "cli.raw", container, str(src),
                cwd=work)), sc_w))
        drop_caches()
        rows.append((sc_r, timed(lambda: sc_download(conn, container, "sc.raw")), ""))
        drop_caches()
        rows.append(("read: dd from imagefs, cold",
                     timed(lambda: dd(m.path("s", "fs.raw"), "/dev/null")), sc_r))
        drop_caches()  # the kernel's page cache only: imagefs's block cache stays warm
        rows.append(("read: dd from imagefs, imagefs cache warm",
                     timed(lambda: dd(m.path("s", "fs.raw"), "/dev/null")), sc_r))
        drop_caches()
        rows.append(("read: dd from imagefs, of swiftclient's object",
                     timed(lambda: dd(m.path("s", "sc.raw"), "/dev/null")), sc_r))
        if SWIFT_CLI:
            drop_caches()
            rows.append(("read: swift download (CLI)", timed(lambda: cli(
                auth, user, key, "download", container, "cli.raw", "-o", "/dev/null",
                cwd=work)), sc_r))
        subprocess.run(["cmp", str(src), str(m.path("s", "fs.raw"))], check=True)
    finally:
        unmount(m)
        conn.close()
    report(title, size, rows)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    size = int(args[0]) * MiB if args else 512 * MiB
    rgw = "--no-rgw" not in sys.argv
    work = Path(tempfile.mkdtemp(prefix="imagefs-bench-"))
    backends = [make("swift", work / "backends")] + ([make("ceph", work / "backends")]
                                                     if rgw else [])
    errors = start_many(backends)
    if errors:
        raise SystemExit(f"backends did not start: {errors}")
    try:
        src = work / "src.raw"
        with open(src, "wb") as f:
            for _ in range(size // MiB):
                f.write(os.urandom(MiB))
        sw = backends[0].info
        bench_one("Swift (tempauth, swift-* 2.30)", sw.auth_url, sw.user, sw.key, src, work)
        if rgw:
            ce = backends[1].info
            bench_one("RGW Swift API (Ceph 16.2, memstore)", str(ce.rgw_swift_auth_url),
                      str(ce.rgw_swift_user), str(ce.rgw_swift_key), src, work)
    finally:
        for b in reversed(backends):
            b.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
