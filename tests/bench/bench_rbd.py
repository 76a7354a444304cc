"""Benchmark the rbd store: sequential write and read through the mount next to librbd's own.

    sudo .venv/bin/python -m tests.bench.bench_rbd [SIZE_MIB]

One run, one cluster (the harness's ``ceph2``: no RGW, memstore OSD), one pool, the same random
source file and size for every contender, run one after the other:

* librbd from Python: ``Image.write``/``Image.read`` in 4 MiB chunks (what imagefs calls);
* the ``rbd`` CLI: ``rbd import`` / ``rbd export`` (to /dev/null);
* imagefs: ``dd bs=4M conv=fsync`` into the store (publish at close included), then ``dd`` out
  with page caches dropped, cold (imagefs's block cache empty) and warm (its cache filled by
  the cold read; only the kernel's page cache is dropped).

Each image is removed after its run, so the memstore OSD never holds more than two copies.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.backends import make
from tests.bench.common import MiB, dd, drop_caches, report, timed
from tests.mounting import mount, unmount

CHUNK = 4 * MiB


def librbd_write(ioctx: Any, name: str, src: Path, size: int) -> None:
    import rbd

    rbd.RBD().create(ioctx, name, size)
    with rbd.Image(ioctx, name) as image, open(src, "rb", buffering=0) as f:
        for off in range(0, size, CHUNK):
            image.write(f.read(CHUNK), off)
        image.flush()


def librbd_read(ioctx: Any, name: str, size: int) -> None:
    import rbd

    with rbd.Image(ioctx, name, read_only=True) as image:
        for off in range(0, size, CHUNK):
            image.read(off, min(CHUNK, size - off))


def main() -> None:
    import rados
    import rbd

    size = int(sys.argv[1]) * MiB if len(sys.argv) > 1 else 512 * MiB
    work = Path(tempfile.mkdtemp(prefix="imagefs-bench-rbd-"))
    ceph = make("ceph2", work / "backends")
    ceph.start()
    try:
        info = ceph.info
        cli = ["rbd", "-c", info.conf, "--keyring", info.keyring, "--id", info.user]
        cluster = rados.Rados(conffile=info.conf, rados_id=info.user,
                              conf={"keyring": info.keyring})
        cluster.connect(timeout=30)
        pool = "bench"
        cluster.create_pool(pool)
        ioctx = cluster.open_ioctx(pool)
        rbd.RBD().pool_init(ioctx, True)
        src = work / "src.raw"
        with open(src, "wb") as f:
            for _ in range(size // MiB):
                f.write(os.urandom(MiB))

        drop_caches()
        t_lw = timed(lambda: librbd_write(ioctx, "lib.raw", src, size))
        t_lr = timed(lambda: librbd_read(ioctx, "lib.raw", size))
        rbd.RBD().remove(ioctx, "lib.raw")

        drop_caches()
        t_imp = timed(lambda: subprocess.run([*cli, "import", "--no-progress", str(src),
                                              f"{pool}/cli.raw"], check=True))
        t_exp = timed(lambda: subprocess.run(
            [*cli, "export", "--no-progress", f"{pool}/cli.raw", "-"], check=True,
            stdout=subprocess.DEVNULL))
        rbd.RBD().remove(ioctx, "cli.raw")

        m = mount(work / "m", {"r": {"type": "rbd", "conf": info.conf, "pool": pool,
                                     "user": info.user, "keyring": info.keyring}},
                  cache={"memory_size": "256MiB", "disk_size": "2GiB",
                         "block_size": os.environ.get("BENCH_BLOCK_SIZE", "1MiB")},
                  debug=False)
        try:
            drop_caches()
            t_fw = timed(lambda: dd(src, m.path("r", "via.raw"), extra=("conv=fsync",)))
            drop_caches()
            t_cold = timed(lambda: dd(m.path("r", "via.raw"), "/dev/null"))
            drop_caches()  # kernel page cache only: imagefs's block cache stays warm
            t_warm = timed(lambda: dd(m.path("r", "via.raw"), "/dev/null"))
        finally:
            unmount(m)
        ioctx.close()
        cluster.shutdown()

        lib_w, lib_r = "write: librbd Image.write 4 MiB", "read: librbd Image.read 4 MiB"
        report("rbd store vs librbd (ceph memstore OSD on 127.0.0.1)", size, [
            (lib_w, t_lw, ""),
            ("write: rbd import", t_imp, lib_w),
            ("write: dd bs=4M into imagefs (incl. publish)", t_fw, lib_w),
            (lib_r, t_lr, ""),
            ("read: rbd export", t_exp, lib_r),
            ("read: dd bs=4M from imagefs, cold", t_cold, lib_r),
            ("read: dd bs=4M from imagefs, cache warm", t_warm, lib_r),
        ])
        print(f"  imagefs write / rbd import: {t_imp / t_fw:5.2f}x   "
              f"imagefs cold read / rbd export: {t_exp / t_cold:5.2f}x")
    finally:
        ceph.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
