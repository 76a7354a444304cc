"""Benchmark the core engine: file store vs the disk itself, http store vs curl on nginx.

    sudo .venv/bin/python -m tests.bench.bench_core [SIZE_MIB]

Everything runs in one go on this machine, side by side, and prints MB/s and ratios. Page
caches are dropped before cold reads; "warm" reads hit imagefs's own block cache (http).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.backends import make
from tests.bench.common import MiB, dd, drop_caches, report, timed
from tests.mounting import mount, unmount


def main() -> None:
    size = int(sys.argv[1]) * MiB if len(sys.argv) > 1 else 512 * MiB
    work = Path(tempfile.mkdtemp(prefix="imagefs-bench-"))
    nginx = make("nginx", work / "backends")
    nginx.start()
    try:
        info = nginx.info
        src = work / "src.raw"
        with open(src, "wb") as f:
            for _ in range(size // MiB):
                f.write(os.urandom(MiB))
        store_dir = work / "store"
        store_dir.mkdir()
        served = info.root / "b"
        served.mkdir()
        os.link(src, served / "img.raw")
        m = mount(work / "m", {
            "file": {"type": "file", "path": str(store_dir)},
            "web": {"type": "http", "url": f"{info.url}b/"},
        }, cache={"memory_size": "256MiB", "disk_size": "2GiB",
                  "block_size": os.environ.get("BENCH_BLOCK_SIZE", "1MiB")}, debug=False)
        try:
            drop_caches()
            t_disk_w = timed(lambda: dd(src, store_dir / "direct.raw", extra=("conv=fsync",)))
            drop_caches()
            t_fs_w = timed(lambda: dd(src, m.path("file", "via.raw"), extra=("conv=fsync",)))
            drop_caches()
            t_disk_r = timed(lambda: dd(store_dir / "direct.raw", "/dev/null"))
            drop_caches()
            t_fs_r = timed(lambda: dd(m.path("file", "via.raw"), "/dev/null"))
            report("file store", size, [
                ("write: dd to the directory itself", t_disk_w, ""),
                ("write: dd into imagefs file store", t_fs_w, "write: dd to the directory itself"),
                ("read: dd from the directory itself", t_disk_r, ""),
                ("read: dd from imagefs file store", t_fs_r, "read: dd from the directory itself"),
            ])
            drop_caches()
            t_curl = timed(lambda: subprocess.run(
                ["curl", "-sf", "-o", "/dev/null", f"{info.url}b/img.raw"], check=True))
            drop_caches()
            t_cold = timed(lambda: dd(m.path("web", "img.raw"), "/dev/null"))
            drop_caches()  # kernel page cache only: imagefs's block cache stays warm
            t_warm = timed(lambda: dd(m.path("web", "img.raw"), "/dev/null"))
            report("http store (nginx on 127.0.0.1)", size, [
                ("curl GET (whole file)", t_curl, ""),
                ("dd via imagefs, cold", t_cold, "curl GET (whole file)"),
                ("dd via imagefs, imagefs cache warm", t_warm, "curl GET (whole file)"),
            ])
        finally:
            unmount(m)
    finally:
        nginx.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
