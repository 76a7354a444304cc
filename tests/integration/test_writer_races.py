"""Writers racing with readers, renames and unlinks on one image (file store): readers see the
published image whole, names never point at half-written or discarded bytes."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_common import MiB


def _store(mount_factory: Any, tmp_path: Path) -> tuple[Any, Path]:
    d = tmp_path / "store"
    d.mkdir()
    return mount_factory({"a": {"type": "file", "path": str(d)}}), d


def test_readers_get_the_whole_published_image_during_a_shrinking_rewrite(
        mount_factory: Any, tmp_path: Path) -> None:
    """dd without conv=notrunc opens, then ftruncate(0)s: st_size must not drop below the
    published size meanwhile, or the kernel cuts readers' copies short (exit 0)."""
    m, d = _store(mount_factory, tmp_path)
    old = os.urandom(100_000)
    m.path("a", "img.raw").write_bytes(old)
    fd = os.open(m.path("a", "img.raw"), os.O_WRONLY)
    try:
        os.ftruncate(fd, 10)
        os.pwrite(fd, b"new", 0)
        assert os.stat(m.path("a", "img.raw")).st_size == len(old)
        r = subprocess.run(["cat", str(m.path("a", "img.raw"))], capture_output=True, check=True)
        assert r.stdout == old
    finally:
        os.close(fd)
    assert m.path("a", "img.raw").read_bytes() == b"new" + old[3:10]


def test_shrinking_an_image_open_for_reading_is_refused(mount_factory: Any,
                                                       tmp_path: Path) -> None:
    """O_TRUNC (the kernel sets the size to 0 at once) or truncate below the size of a version
    being read would make its readers stop early without an error: ETXTBSY. Readers that open
    while a writer is at work read without the kernel's size cap and get their whole version;
    a replacement by rename works."""
    m, d = _store(mount_factory, tmp_path)
    old = os.urandom(2 * MiB)
    m.path("a", "img.raw").write_bytes(old)
    with open(m.path("a", "img.raw"), "rb") as r:
        assert r.read(4096) == old[:4096]
        for fn in (lambda: open(m.path("a", "img.raw"), "wb"),
                   lambda: os.truncate(m.path("a", "img.raw"), MiB)):
            with pytest.raises(OSError) as e:
                fn()
            assert e.value.errno == errno.ETXTBSY
        assert r.read() == old[4096:]
    os.truncate(m.path("a", "img.raw"), 3 * MiB)  # no reader now: a new version
    grown = old + bytes(MiB)
    assert m.path("a", "img.raw").read_bytes() == grown

    new = os.urandom(MiB)
    with open(m.path("a", "img.raw"), "wb", buffering=0) as w:  # no reader now: allowed
        w.write(new[:1000])
        with open(m.path("a", "img.raw"), "rb") as r2:  # opened mid-write: whole old version
            w.write(new[1000:])
            assert r2.read() == grown
    assert m.path("a", "img.raw").read_bytes() == new
    with open(m.path("a", "img.raw"), "rb") as r:
        m.path("a", "img.tmp").write_bytes(b"small")
        os.rename(m.path("a", "img.tmp"), m.path("a", "img.raw"))
        assert r.read(10) == new[:10]
    assert m.path("a", "img.raw").read_bytes() == b"small"


def test_o_trunc_rewrite_keeps_the_name_and_unlink_removes_it(mount_factory: Any,
                                                              tmp_path: Path) -> None:
    m, d = _store(mount_factory, tmp_path)
    old = os.urandom(3 * MiB)
    m.path("a", "img.raw").write_bytes(old)
    with open(m.path("a", "img.raw"), "wb", buffering=0) as f:  # O_TRUNC
        f.write(b"half")
        assert os.stat(m.path("a", "img.raw")).st_size == len(old)
        assert m.path("a", "img.raw").read_bytes() == old
        os.unlink(m.path("a", "img.raw"))
        assert not m.path("a", "img.raw").exists()
        assert not (d / "img.raw").exists()
        f.write(b"more")
    assert not m.path("a", "img.raw").exists()
    assert [n for n in os.listdir(d) if not n.startswith(".")] == []


def test_close_after_unlink_leaves_a_new_image_of_that_name_alone(mount_factory: Any,
                                                                   tmp_path: Path) -> None:
    m, d = _store(mount_factory, tmp_path)
    with open(m.path("a", "w.img"), "wb", buffering=0) as f:
        f.write(b"A" * 1000)
        os.unlink(m.path("a", "w.img"))
        m.path("a", "w.img").write_bytes(b"BBBB")
        f.write(b"A" * 1000)
    assert m.path("a", "w.img").read_bytes() == b"BBBB"
    assert (d / "w.img").read_bytes() == b"BBBB"


_HOLDER = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
os.pwrite(fd, b"HALF", 0)
print("ready", flush=True)
sys.stdin.readline()
os.pwrite(fd, b"DONE", 4)
os.close(fd)
"""


def test_rename_of_an_image_another_process_is_writing_is_refused(mount_factory: Any,
                                                                   tmp_path: Path) -> None:
    """mv by someone else mid-write would publish half the rewrite under the new name; the
    writer's own write-fsync-rename-close publishes it whole."""
    m, d = _store(mount_factory, tmp_path)
    m.path("a", "x.img").write_bytes(b"x" * 100)
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(m.path("a", "x.img"))],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        with pytest.raises(OSError) as e:
            os.rename(m.path("a", "x.img"), m.path("a", "y.img"))
        assert e.value.errno == errno.EBUSY
        assert not m.path("a", "y.img").exists()
        assert m.path("a", "x.img").read_bytes() == b"x" * 100
    finally:
        p.communicate("go\n", timeout=60)
    assert p.returncode == 0
    assert m.path("a", "x.img").read_bytes() == b"HALFDONE" + b"x" * 92

    with open(m.path("a", "t.img"), "wb", buffering=0) as f:
        f.write(b"whole")
        os.fsync(f.fileno())
        os.rename(m.path("a", "t.img"), m.path("a", "final.img"))
    assert m.path("a", "final.img").read_bytes() == b"whole"
    assert not m.path("a", "t.img").exists()


def test_failed_publish_never_publishes_zeros_later(mount_factory: Any,
                                                    tmp_path: Path) -> None:
    """The publish (here: forced by the writer's own rename) fails; the writer goes on and
    closes. Its first bytes went with the aborted upload, so nothing may be published: not
    the later bytes over zeros."""
    m, d = _store(mount_factory, tmp_path)
    m.path("a", "x.img").write_bytes(b"B" * 8)
    fd = os.open(m.path("a", "x.img"), os.O_RDWR)
    try:
        os.pwrite(fd, b"A", 0)
        subprocess.run(["chattr", "+i", str(d)], check=True)
        try:
            with pytest.raises(OSError):
                os.rename(m.path("a", "x.img"), m.path("a", "y.img"))
        finally:
            subprocess.run(["chattr", "-i", str(d)], check=True)
        with pytest.raises(OSError) as e:
            os.pread(fd, 8, 0)
        assert e.value.errno == errno.EIO
        os.pwrite(fd, b"Z", 7)
    finally:
        with pytest.raises(OSError):
            os.close(fd)
    assert m.path("a", "x.img").read_bytes() == b"B" * 8
    assert (d / "x.img").read_bytes() == b"B" * 8


def test_file_store_reader_never_reads_a_later_image(mount_factory: Any,
                                                     tmp_path: Path) -> None:
    """ext4 hands a freed inode number to the next new file: after two replacements a reader
    pinned by inode number alone would read the third image. It gets EIO (or its own bytes)."""
    m, d = _store(mount_factory, tmp_path)
    m.path("a", "v.img").write_bytes(b"a" * MiB)
    fd = os.open(m.path("a", "v.img"), os.O_RDONLY)
    try:
        ino = os.stat(d / "v.img").st_ino
        for i in range(12):
            m.path("a", "v.tmp").write_bytes(bytes([ord("c") + i]) * MiB)
            os.rename(m.path("a", "v.tmp"), m.path("a", "v.img"))
            try:
                got = os.pread(fd, 4096, MiB - 4096 * (i + 1))
            except OSError as e:
                assert e.errno == errno.EIO
                continue
            assert got == b"a" * 4096, (i, os.stat(d / "v.img").st_ino == ino, got[:8])
    finally:
        os.close(fd)
