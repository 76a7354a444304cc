"""Benchmark the S3 store against boto3's own transfers on the same RGW, in one run.

    sudo .venv/bin/python -m tests.bench.bench_s3 [SIZE_MIB]

Starts a single-node Ceph with RGW (memstore: data lives in RAM, so the backend is not the
bottleneck), then writes and reads the same amount of data through boto3's managed transfer
(upload_file / download_fileobj: multipart, 10 threads) and through an imagefs mount with
``dd bs=4M``, and prints MB/s and ratios. Cold reads follow a page-cache drop and a fresh
mount; warm reads are served from imagefs's own block cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.backends import make
from tests.backends.fixtures import s3_client
from tests.bench.common import MiB, dd, drop_caches, report, timed
from tests.mounting import mount, unmount


def main() -> None:
    size = int(sys.argv[1]) * MiB if len(sys.argv) > 1 else 512 * MiB
    work = Path(tempfile.mkdtemp(prefix="imagefs-bench-s3-"))
    ceph = make("ceph", work / "backends")
    ceph.start()
    try:
        info = ceph.info
        s3 = s3_client(info)
        s3.create_bucket(Bucket="bench")
        src = work / "src.raw"
        with open(src, "wb") as f:
            for _ in range(size // MiB):
                f.write(os.urandom(MiB))
        secret = work / "secret"
        secret.write_text(str(info.s3_secret_key))
        secret.chmod(0o600)
        table = {"type": "s3", "endpoint_url": info.s3_endpoint, "bucket": "bench",
                 "addressing_style": "path", "access_key_id": info.s3_access_key,
                 "secret_access_key_file": str(secret),
                 "part_size": os.environ.get("BENCH_PART_SIZE", "8MiB"),
                 "upload_concurrency": int(os.environ.get("BENCH_UPLOAD_CONCURRENCY", "4"))}
        cache = {"memory_size": "256MiB", "disk_size": "2GiB",
                 "block_size": os.environ.get("BENCH_BLOCK_SIZE", "4MiB")}

        drop_caches()
        t_boto_w = timed(lambda: s3.upload_file(str(src), "bench", "boto.raw"))
        drop_caches()
        with open(os.devnull, "wb") as null:
            t_boto_r = timed(lambda: s3.download_fileobj("bench", "boto.raw", null))

        def boto_get_stream() -> None:
            body = s3.get_object(Bucket="bench", Key="boto.raw")["Body"]
            while body.read(4 * MiB):
                pass

        t_boto_get = timed(boto_get_stream)
        m = mount(work / "m", {"s3": table}, cache=cache, debug=False)
        try:
            drop_caches()
            t_fs_w = timed(lambda: dd(src, m.path("s3", "via.raw")))
        finally:
            unmount(m)
        m = mount(work / "m2", {"s3": table}, cache=cache, debug=False)
        try:
            drop_caches()
            t_fs_cold = timed(lambda: dd(m.path("s3", "via.raw"), "/dev/null"))
            drop_caches()
            t_fs_warm = timed(lambda: dd(m.path("s3", "via.raw"), "/dev/null"))
            subprocess.run(["cmp", str(src), str(m.path("s3", "via.raw"))], check=True)
        finally:
            unmount(m)
        report("s3 store (Ceph RGW on 127.0.0.1, memstore)", size, [
            ("write: boto3 upload_file (multipart, 10 thr)", t_boto_w, ""),
            ("write: dd into imagefs", t_fs_w, "write: boto3 upload_file (multipart, 10 thr)"),
            ("read: boto3 download_fileobj (10 thr)", t_boto_r, ""),
            ("read: boto3 get_object, one stream", t_boto_get, ""),
            ("read: dd from imagefs, cold", t_fs_cold, "read: boto3 download_fileobj (10 thr)"),
            ("read: dd from imagefs, imagefs cache warm", t_fs_warm,
             "read: boto3 download_fileobj (10 thr)"),
        ])
    finally:
        ceph.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
