"""Writers racing with readers, renames and unlinks on one image (file store): readers see the
published image whole, names never point at half-written or discarded bytes."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_common import MiB


def _store(mount_factory: Any, tmp_path: Path, page_cache: bool = False) -> tuple[Any, Path]:
    d = tmp_path / "store"
    d.mkdir()
    return mount_factory({"a": {"type": "file", "path": str(d)}},
                         cache={"page_cache": page_cache}), d


def test_readers_get_the_whole_published_image_during_a_shrinking_rewrite(
        mount_factory: Any, tmp_path: Path) -> None:
    """dd without conv=notrunc opens, then ftruncate(0)s: a reader opening meanwhile must
    not be stopped at the writer's size (a short copy, exit 0), nor see a smaller st_size."""
    m, d = _store(mount_factory, tmp_path)
    old = os.urandom(100_000)
    m.path("a", "img.raw").write_bytes(old)
    fd = os.open(m.path("a", "img.raw"), os.O_WRONLY)
    try:
        os.ftruncate(fd, 10)
        os.pwrite(fd, b"new", 0)
        r = subprocess.run(["cat", str(m.path("a", "img.raw"))], capture_output=True, check=True)
        assert r.stdout == old
        with open(m.path("a", "img.raw"), "rb") as reader:
            assert os.fstat(reader.fileno()).st_size == len(old)
            assert reader.read() == old
    finally:
        os.close(fd)
    assert m.path("a", "img.raw").read_bytes() == b"new" + old[3:10]


def test_shrinking_an_image_open_for_reading_is_refused(mount_factory: Any,
                                                       tmp_path: Path) -> None:
    """O_TRUNC (the kernel sets the size to 0 at once) or truncate below the size of a version
    being read would make its readers stop early without an error: ETXTBSY. Readers that open
    while a writer is at work read without the kernel's size cap and get their whole version;
    a replacement by rename works. (Page-cache readers: ``cache.page_cache = true``.)"""
    m, d = _store(mount_factory, tmp_path, page_cache=True)
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
        assert m.path("a", "img.raw").exists()
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


def test_reader_of_a_newer_version_is_not_cut_short_by_an_older_reader(
        mount_factory: Any, tmp_path: Path) -> None:
    """A reader of the old, smaller version reaching its end makes the kernel lower the
    file's size: a page-cache reader of the new version would stop there. It reads direct."""
    m, d = _store(mount_factory, tmp_path)
    v1, ext = os.urandom(MiB), os.urandom(MiB)
    m.path("a", "tv.img").write_bytes(v1)
    r1 = os.open(m.path("a", "tv.img"), os.O_RDONLY)
    try:
        assert os.pread(r1, 4096, 0) == v1[:4096]
        with open(m.path("a", "tv.img"), "ab") as w:  # grows: allowed under readers
            w.write(ext)
        r2 = os.open(m.path("a", "tv.img"), os.O_RDONLY)
        try:
            assert os.fstat(r2).st_size == 2 * MiB
            assert os.pread(r1, 4096, MiB) == b""  # r1's version ends here
            assert os.pread(r2, 65536, MiB + 4096) == ext[4096:4096 + 65536]
        finally:
            os.close(r2)
    finally:
        os.close(r1)


def test_writer_sees_its_own_size_when_nobody_reads(mount_factory: Any,
                                                    tmp_path: Path) -> None:
    m, d = _store(mount_factory, tmp_path)
    m.path("a", "img").write_bytes(os.urandom(MiB))
    fd1 = os.open(m.path("a", "img"), os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd1, b"hello")
        assert os.lseek(fd1, 0, os.SEEK_END) == 5
        fd2 = os.open(m.path("a", "img"), os.O_WRONLY | os.O_APPEND)
        os.write(fd2, b"world")
        os.close(fd2)
    finally:
        os.close(fd1)
    assert m.path("a", "img").read_bytes() == b"helloworld"


def test_a_new_rewrite_is_not_tied_to_a_failed_one(mount_factory: Any,
                                                    tmp_path: Path) -> None:
    """A's publish fails while another process still holds the image open for writing; B's
    complete rewrite from a fresh O_TRUNC open publishes (A's lost bytes never do)."""
    m, d = _store(mount_factory, tmp_path)
    p = m.path("a", "img3")
    p.write_bytes(b"A" * 100_000)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(p)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        fa = os.open(p, os.O_WRONLY)
        os.pwrite(fa, b"x" * 10, 0)
        subprocess.run(["chattr", "+i", str(d)], check=True)
        try:
            with pytest.raises(OSError):
                os.rename(p, m.path("a", "moved"))  # publishes first: fails
        finally:
            subprocess.run(["chattr", "-i", str(d)], check=True)
        with pytest.raises(OSError):
            os.close(fa)
        with open(p, "wb") as fb:
            fb.write(b"B" * 5000)
        assert p.read_bytes() == b"B" * 5000
    finally:
        holder.communicate("go\n", timeout=60)
    assert holder.returncode != 0  # its close reports the lost bytes
    assert p.read_bytes() == b"B" * 5000


def _replace_in_store(d: Path, name: str, data: bytes) -> None:
    """As another host sharing the store would: a new file renamed over the image."""
    (d / f".other-{name}").write_bytes(data)
    os.rename(d / f".other-{name}", d / name)


def test_image_replaced_elsewhere_is_read_whole_or_not_at_all(mount_factory: Any,
                                                              tmp_path: Path) -> None:
    """The kernel's idea of the size comes from the last stat. A reader pinned to a bigger
    version replaced elsewhere must still read all of it; a reader of a version replaced by a
    smaller one gets its bytes or EIO, never an early clean EOF."""
    m, d = _store(mount_factory, tmp_path)
    small, big = os.urandom(MiB), os.urandom(4 * MiB)
    _replace_in_store(d, "a.img", small)
    assert os.stat(m.path("a", "a.img")).st_size == MiB  # the kernel now holds 1 MiB
    _replace_in_store(d, "a.img", big)
    r = subprocess.run(["cat", str(m.path("a", "a.img"))], capture_output=True, check=True)
    assert r.stdout == big

    eight = os.urandom(8 * MiB)
    _replace_in_store(d, "b.img", eight)
    with open(m.path("a", "b.img"), "rb", buffering=0) as f:
        assert f.read(MiB) == eight[:MiB]
        _replace_in_store(d, "b.img", small)
        time.sleep(3)  # past the metadata TTL: the kernel asks for the size again
        os.stat(m.path("a", "b.img"))
        f.seek(4 * MiB)
        try:
            got = f.read(MiB)
        except OSError as e:
            assert e.errno == errno.EIO
        else:
            assert got == eight[4 * MiB:5 * MiB], len(got)
