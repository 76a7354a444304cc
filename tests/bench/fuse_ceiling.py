"""The FUSE ceiling on this machine: a minimal pyfuse3 file system serving one file from memory.

    sudo .venv/bin/python -m tests.bench.fuse_ceiling [SIZE_MIB]

No cache, no backend, no bookkeeping: every read answers with slices of one 1 MiB buffer. What
``dd bs=4M`` gets from it (page cache dropped first) is what any pyfuse3 + trio daemon can reach
here, so imagefs's figures are judged against it. Mounted with the settings imagefs uses
(read_ahead_kb and max_background raised through sysfs).
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyfuse3
import trio

from imagefs.kernel import tune_connection

MiB = 1 << 20


class MemFS(pyfuse3.Operations):
    def __init__(self, size: int, direct: bool) -> None:
        super().__init__()
        self.size = size
        self.direct = direct
        self.buf = memoryview(os.urandom(MiB))

    async def getattr(self, inode: int, ctx: object = None) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode, a.st_size = stat.S_IFDIR | 0o755, 0
        elif inode == 2:
            a.st_mode, a.st_size = stat.S_IFREG | 0o644, self.size
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        a.attr_timeout = a.entry_timeout = 60
        return a

    async def lookup(self, parent: int, name: bytes, ctx: object = None
                     ) -> pyfuse3.EntryAttributes:
        if parent == pyfuse3.ROOT_INODE and name == b"data":
            return await self.getattr(2)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def open(self, inode: int, flags: int, ctx: object) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=inode, keep_cache=False, direct_io=self.direct)

    async def read(self, fh: int, off: int, size: int) -> memoryview:
        size = max(0, min(size, self.size - off))
        a = off % MiB
        if a + size <= MiB:
            return self.buf[a:a + size]
        return bytes(self.buf[a:]) + bytes(self.buf[:size - (MiB - a)])


def serve(mnt: str, size: int, direct: bool, ready: threading.Event) -> None:
    pyfuse3.init(MemFS(size, direct), mnt, set(pyfuse3.default_options) | {"fsname=ceiling"})
    ready.set()
    try:
        trio.run(pyfuse3.main, 4, 64)
    finally:
        pyfuse3.close(unmount=False)


def measure(size: int, direct: bool) -> float:
    """MB/s of ``dd bs=4M`` from a fresh mount (page cache dropped first)."""
    mnt = tempfile.mkdtemp(prefix="imagefs-ceiling-")
    ready = threading.Event()
    t = threading.Thread(target=serve, args=(mnt, size, direct, ready), daemon=True)
    t.start()
    ready.wait()
    time.sleep(0.5)
    tune_connection(mnt, read_ahead_kib=64 << 10)
    try:
        subprocess.run(["sync"], check=False)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        t0 = time.perf_counter()
        subprocess.run(["dd", f"if={mnt}/data", "of=/dev/null", "bs=4M", "status=none"],
                       check=True)
        return size / (time.perf_counter() - t0) / 1e6
    finally:
        subprocess.run(["fusermount3", "-u", "-z", mnt], check=False)
        t.join(timeout=10)


def main() -> None:
    size = int(sys.argv[1]) * MiB if len(sys.argv) > 1 else 1024 * MiB
    for direct in (False, True):
        mode = "direct I/O" if direct else "page cache"
        print(f"pyfuse3 from memory, {mode}, dd bs=4M: {measure(size, direct):.0f} MB/s")


if __name__ == "__main__":
    main()
