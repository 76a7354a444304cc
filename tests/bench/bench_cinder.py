"""Benchmark the cinder store: sequential write and read through the mount next to librbd on
the same Cinder volume.

    sudo .venv/bin/python -m tests.bench.bench_cinder [SIZE_MIB]

One run starts its own Ceph (memstore OSD) and Cinder (RBD driver), one project:

* librbd from Python on a Cinder volume attached as imagefs attaches it (attachment rw, then
  ``Image.write``/``Image.read`` in 4 MiB chunks): the data path's ceiling;
* imagefs: ``dd bs=4M conv=fsync`` into the store (volume create + attach + the extends the
  image needs + publish included), then ``dd`` out with page caches dropped, cold (imagefs's
  block cache empty, first read attaches) and warm (its cache filled by the cold read);
* librbd again, reading the volume imagefs wrote.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.backends import make, start_many, stop_order
from tests.backends.cinder import CinderProject, api_call, new_project_id, wait_volume
from tests.bench.common import MiB, dd, drop_caches, report, timed, write_random
from tests.kinds.cinder import cinder_table
from tests.mounting import mount, unmount

CHUNK = 4 * MiB
GiB = 1 << 30
CONNECTOR = {"host": "bench", "ip": "127.0.0.1", "platform": "x86_64", "os_type": "linux",
             "multipath": False}


def attach(project: CinderProject, vid: str, mode: str) -> tuple[str, str]:
    """(attachment id, RBD image name) of an attachment made as imagefs makes one."""
    status, att = api_call("POST", f"{project.url}/attachments", project.token, {"attachment": {
        "volume_uuid": vid, "connector": CONNECTOR, "mode": mode}}, version="3.54")
    assert status == 200, att
    aid = att["attachment"]["id"]
    api_call("POST", f"{project.url}/attachments/{aid}/action", project.token,
             {"os-complete": None}, version="3.44")
    return aid, att["attachment"]["connection_info"]["name"].split("/")[1]


def detach(project: CinderProject, aid: str) -> None:
    api_call("DELETE", f"{project.url}/attachments/{aid}", project.token, version="3.27")


def librbd_write(ioctx: Any, image: str, src: Path, size: int) -> None:
    import rbd

    with rbd.Image(ioctx, image) as img, open(src, "rb", buffering=0) as f:
        for off in range(0, size, CHUNK):
            img.write(f.read(CHUNK), off)
        img.flush()


def librbd_read(ioctx: Any, image: str, size: int) -> None:
    import rbd

    with rbd.Image(ioctx, image, read_only=True) as img:
        for off in range(0, size, CHUNK):
            img.read(off, min(CHUNK, size - off))


def main() -> None:
    import rados

    size = int(sys.argv[1]) * MiB if len(sys.argv) > 1 else 512 * MiB
    work = Path(tempfile.mkdtemp(prefix="imagefs-bench-cinder-"))
    backends = [make("ceph", work / "backends"), make("cinder", work / "backends")]
    errors = start_many(backends)
    try:
        if errors:
            raise SystemExit(f"backends failed: {errors}")
        info = backends[1].info
        project = CinderProject(info, new_project_id())
        src = write_random(work / "src.raw", size)
        cluster = rados.Rados(conffile=info.ceph_conf, rados_id=info.ceph_user,
                              conf={"keyring": info.ceph_keyring})
        cluster.connect(timeout=30)
        ioctx = cluster.open_ioctx(info.pool)

        _, body = api_call("POST", f"{project.url}/volumes", project.token,
                           {"volume": {"size": -(-size // GiB), "name": "lib"}})
        vid = body["volume"]["id"]
        wait_volume(project.url, project.token, vid, "available")
        aid, image = attach(project, vid, "rw")
        drop_caches()
        t_lw = timed(lambda: librbd_write(ioctx, image, src, size))
        t_lr = timed(lambda: librbd_read(ioctx, image, size))
        detach(project, aid)

        m = mount(work / "m", {"c": cinder_table(project)},
                  cache={"memory_size": "256MiB", "disk_size": "2GiB"}, debug=False)
        try:
            drop_caches()
            t_fw = timed(lambda: dd(src, m.path("c", "via.raw"), extra=("conv=fsync",)))
            drop_caches()
            t_cold = timed(lambda: dd(m.path("c", "via.raw"), "/dev/null"))
            drop_caches()
            t_warm = timed(lambda: dd(m.path("c", "via.raw"), "/dev/null"))
        finally:
            unmount(m)
        via = [v for v in project.volumes() if v["name"] == "via.raw"][0]
        aid, image = attach(project, via["id"], "ro")
        drop_caches()
        t_lvia = timed(lambda: librbd_read(ioctx, image, size))
        detach(project, aid)
        ioctx.close()
        cluster.shutdown()

        lib_w, lib_r = "write: librbd Image.write 4 MiB", "read: librbd Image.read 4 MiB"
        report("cinder store vs librbd (Cinder RBD driver, ceph memstore OSD, 127.0.0.1)",
               size, [
                   (lib_w, t_lw, ""),
                   ("write: dd bs=4M into imagefs (incl. publish)", t_fw, lib_w),
                   (lib_r, t_lr, ""),
                   ("read: librbd, the volume imagefs wrote", t_lvia, lib_r),
                   ("read: dd bs=4M from imagefs, cold", t_cold, lib_r),
                   ("read: dd bs=4M from imagefs, cache warm", t_warm, lib_r),
               ])
        project.purge()
    finally:
        for group in stop_order(backends):
            for b in group:
                b.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
