"""A cache directory that is full (a small tmpfs): reads go on uncached, spooled writes fail
with ENOSPC and publish nothing, and nothing else breaks."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_common import MiB


@pytest.fixture
def small_cache(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "tiny-cache"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.mark.parametrize("kind", ["s3", "swift"])
def test_a_full_cache_directory_fails_spooled_writes_cleanly_and_reads_go_on(
        kind: str, request: pytest.FixtureRequest, mount_factory: Any, small_cache: Path,
        tmp_path: Path) -> None:
    table = request.getfixturevalue(f"{kind}_store_table")
    data = os.urandom(20 * MiB)
    src = tmp_path / "src.raw"
    src.write_bytes(data)
    m = mount_factory({"s": table})  # a cache with room: the image goes in
    subprocess.run(["cp", str(src), str(m.path("s", "ok.raw"))], check=True)
    # The tiny cache directory, filled up: no disk cache, no spool space.
    m2 = mount_factory({"s": table}, cache={"dir": str(small_cache), "disk_size": "1GiB"})
    fd = os.open(small_cache / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:  # unbuffered: a last partial write leaves nothing for close() to fail on
        while True:
            os.write(fd, bytes(MiB))
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    for _ in range(2):  # read from the store each time, the disk cache cannot take blocks
        assert hashlib.sha256(m2.path("s", "ok.raw").read_bytes()).digest() == \
            hashlib.sha256(data).digest()
    for name, order in (("inorder.raw", range(0, len(data), MiB)),
                        ("random.raw", reversed(range(0, len(data), MiB)))):
        with pytest.raises(OSError) as e:
            fd = os.open(m2.path("s", name), os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                for off in order:
                    os.pwrite(fd, data[off:off + MiB], off)
            finally:
                os.close(fd)
        assert e.value.errno in (errno.ENOSPC, errno.EIO), e.value
        assert not m2.path("s", name).exists(), f"{name}: a write that failed was published"
    assert sorted(os.listdir(m2.path("s"))) == ["ok.raw"]
    assert m2.path("s", "ok.raw").read_bytes() == data
