"""The file system's rules without a kernel: ``FileSystem`` driven directly over MemStore.

Each test is one guarantee of doc/SEMANTICS.md in the order of requests a kernel would send;
the integration tests check the same guarantees through real mounts with real programs.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from imagefs.attributes import AttrChange
from imagefs.errors import FsError, errno_of
from imagefs.filesystem import FileSystem
from imagefs.stores.base import BackendError, Changed
from imagefs.writer import Writer, WriterState
from tests.memstore import MemStore, make_filesystem

ME = os.getpid()
MODE = stat.S_IFREG | 0o644
NEW = os.O_WRONLY | os.O_CREAT
STRATEGIES = pytest.mark.parametrize("random_write", [False, True], ids=["spool", "direct"])

Body = Callable[[FileSystem], Awaitable[None]]


def run(fs: FileSystem, body: Body) -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            fs.bind(n)
            with trio.fail_after(10):
                await body(fs)
            n.cancel_scope.cancel()

    trio.run(main)


async def refused(code: int, call: Awaitable[Any]) -> None:
    """``call`` fails with errno ``code``, as the FUSE reply would say."""
    try:
        await call
    except Exception as e:  # FsError, store errors, OSError: whatever maps to ``code``
        assert errno_of(e) == code, f"{e!r}: {errno.errorcode.get(errno_of(e))}"
        return
    raise AssertionError(f"expected {errno.errorcode[code]}")


@pytest.fixture
def other() -> Iterator[int]:
    """The pid of another process (a writer's handles remember which process opened them)."""
    p = subprocess.Popen(["sleep", "60"])
    yield p.pid
    p.kill()
    p.wait()


def sino(fs: FileSystem, sid: str = "m") -> int:
    return fs.inodes.store_ino[sid]


async def new_image(fs: FileSystem, name: str, data: bytes, sid: str = "m") -> int:
    """Create, write and close an image; its inode."""
    opened, attr = await fs.create(sino(fs, sid), name, MODE, NEW, ME)
    await fs.write(opened.fh, 0, data)
    await fs.flush(opened.fh)
    await fs.release(opened.fh)
    return attr.ino


# ---------------------------------------------------------------------- when an image appears
@STRATEGIES
def test_a_new_image_is_invisible_to_others_until_its_writer_closes(
        tmp_path: Path, random_write: bool, other: int) -> None:
    store = MemStore(random_write=random_write)

    async def body(fs: FileSystem) -> None:
        opened, _ = await fs.create(sino(fs), "img", MODE, NEW, ME)
        await fs.write(opened.fh, 0, b"a" * 5000)
        await refused(errno.ENOENT, fs.lookup(sino(fs), "img", other))
        assert (await fs.lookup(sino(fs), "img", ME)).size == 5000  # its own writer sees it
        await fs.fsync(opened.fh)
        assert "img" not in store.objects  # fsync never publishes
        await fs.flush(opened.fh)
        assert (await fs.lookup(sino(fs), "img", other)).size == 5000
        await fs.release(opened.fh)

    run(make_filesystem([store], tmp_path), body)
    assert store.objects["img"].data == b"a" * 5000


@STRATEGIES
def test_two_processes_share_one_pending_version_and_each_last_close_publishes_it(
        tmp_path: Path, random_write: bool, other: int) -> None:
    store = MemStore(random_write=random_write)

    async def body(fs: FileSystem) -> None:
        mine, attr = await fs.create(sino(fs), "img", MODE, NEW, ME)
        await fs.write(mine.fh, 0, b"a")
        theirs = await fs.open(attr.ino, os.O_WRONLY, other)
        await fs.write(theirs.fh, 1, b"b")
        await fs.flush(mine.fh)
        await fs.release(mine.fh)
        assert store.objects["img"].data == b"ab"  # the other's writes so far included
        await fs.write(theirs.fh, 2, b"c")
        await fs.flush(theirs.fh)
        await fs.release(theirs.fh)

    run(make_filesystem([store], tmp_path), body)
    assert store.objects["img"].data == b"abc"


def test_read_only_open_with_o_trunc_truncates_where_writes_are_allowed(
        tmp_path: Path) -> None:
    store = MemStore()

    async def body(fs: FileSystem) -> None:
        ino = await new_image(fs, "img", b"x" * 100)
        reader = await fs.open(ino, os.O_RDONLY | os.O_TRUNC, ME)
        assert await fs.read(reader.fh, 0, 100) == b""
        await fs.release(reader.fh)

    run(make_filesystem([store], tmp_path), body)
    assert store.objects["img"].data == b""


@STRATEGIES
def test_an_image_unlinked_while_open_publishes_nothing(tmp_path: Path,
                                                        random_write: bool) -> None:
    store = MemStore(random_write=random_write)

    async def body(fs: FileSystem) -> None:
        ino = await new_image(fs, "img", b"old")
        first = await fs.open(ino, os.O_WRONLY, ME)
        await fs.write(first.fh, 0, b"unlinked")
        await fs.unlink(sino(fs), "img")
        await new_image(fs, "img", b"new")
        await fs.flush(first.fh)
        await fs.release(first.fh)

    run(make_filesystem([store], tmp_path), body)
    assert store.objects["img"].data == b"new"


def test_renaming_an_image_another_process_writes_is_ebusy_and_the_writers_own_publishes(
        tmp_path: Path, other: int) -> None:
    store = MemStore()

    async def body(fs: FileSystem) -> None:
        opened, _ = await fs.create(sino(fs), "img", MODE, NEW, ME)
        await fs.write(opened.fh, 0, b"pending")
        await refused(errno.EBUSY, fs.rename(sino(fs), "img", sino(fs), "b", other))
        assert not store.objects
        await fs.rename(sino(fs), "img", sino(fs), "b", ME)
        assert store.objects["b"].data == b"pending"
        await fs.write(opened.fh, 7, b"+more")
        await fs.flush(opened.fh)  # the writer follows its image to the new name
        await fs.release(opened.fh)

    run(make_filesystem([store], tmp_path), body)
    assert set(store.objects) == {"b"} and store.objects["b"].data == b"pending+more"


def test_rename_across_stores_is_exdev_and_noreplace_keeps_the_target(tmp_path: Path) -> None:
    a, b = MemStore("a"), MemStore("b")

    async def body(fs: FileSystem) -> None:
        await new_image(fs, "x", b"1", "a")
        await new_image(fs, "y", b"2", "a")
        await refused(errno.EXDEV, fs.rename(sino(fs, "a"), "x", sino(fs, "b"), "x", ME))
        await refused(errno.EEXIST, fs.rename(sino(fs, "a"), "x", sino(fs, "a"), "y", ME,
                                              noreplace=True))
        await fs.rename(sino(fs, "a"), "x", sino(fs, "a"), "y", ME)

    run(make_filesystem([a, b], tmp_path), body)
    assert {n: o.data for n, o in a.objects.items()} == {"y": b"1"} and not b.objects


# ---------------------------------------------------------------------- what a reader sees
def test_shrinking_an_image_a_page_cache_reader_holds_is_etxtbsy(tmp_path: Path) -> None:
    store = MemStore()

    async def body(fs: FileSystem) -> None:
        ino = await new_image(fs, "img", b"r" * 10_000)
        await fs.lookup(sino(fs), "img", ME)  # the kernel now knows this version's size
        reader = await fs.open(ino, os.O_RDONLY, ME)
        assert not reader.direct_io
        await refused(errno.ETXTBSY, fs.open(ino, os.O_WRONLY | os.O_TRUNC, ME))
        await refused(errno.ETXTBSY, fs.setattr(ino, AttrChange(size=10)))
        assert await fs.read(reader.fh, 0, 10_000) == b"r" * 10_000
        await fs.setattr(ino, AttrChange(size=20_000))  # growing is fine
        await fs.release(reader.fh)

    run(make_filesystem([store], tmp_path, page_cache=True), body)
    assert store.objects["img"].data == b"r" * 10_000 + bytes(10_000)


def test_shrinking_an_image_a_direct_reader_holds_is_etxtbsy(tmp_path: Path) -> None:
    """Direct readers (the default) would read on, then hit EIO once the rewrite is
    published: refused like page-cache readers; growing is fine."""
    store = MemStore()

    async def body(fs: FileSystem) -> None:
        ino = await new_image(fs, "img", b"r" * 10_000)
        reader = await fs.open(ino, os.O_RDONLY, ME)
        assert reader.direct_io
        await refused(errno.ETXTBSY, fs.open(ino, os.O_WRONLY | os.O_TRUNC, ME))
        await refused(errno.ETXTBSY, fs.setattr(ino, AttrChange(size=10)))
        assert await fs.read(reader.fh, 0, 10_000) == b"r" * 10_000
        await fs.setattr(ino, AttrChange(size=20_000))
        await fs.release(reader.fh)

    run(make_filesystem([store], tmp_path), body)
    assert store.objects["img"].data == b"r" * 10_000 + bytes(10_000)


@STRATEGIES
def test_readers_keep_the_published_size_and_bytes_during_a_shrinking_rewrite(
        tmp_path: Path, random_write: bool) -> None:
    store = MemStore(random_write=random_write)

    async def body(fs: FileSystem) -> None:
        ino = await new_image(fs, "img", b"p" * 50_000)
        writer = await fs.open(ino, os.O_WRONLY | os.O_TRUNC, ME)  # no reader: allowed
        await fs.write(writer.fh, 0, b"n" * 10)
        reader = await fs.open(ino, os.O_RDONLY, ME)  # uncapped: a writer is at work
        assert reader.direct_io
        assert (await fs.getattr(ino)).size == 50_000
        assert await fs.read(reader.fh, 0, 60_000) == b"p" * 50_000
        await fs.flush(writer.fh)
        await fs.release(writer.fh)
        await fs.release(reader.fh)
        assert (await fs.getattr(ino)).size == 10

    run(make_filesystem([store], tmp_path), body)
    assert store.objects["img"].data == b"n" * 10


def test_a_reader_is_pinned_to_its_version_never_a_mix(tmp_path: Path) -> None:
    store = MemStore()

    async def body(fs: FileSystem) -> None:
        ino = await new_image(fs, "img", b"1" * 3000)
        reader = await fs.open(ino, os.O_RDONLY, ME)
        store.put("img", b"2" * 3000, {})  # replaced behind the mount's back
        with pytest.raises(Changed):
            await fs.read(reader.fh, 0, 3000)
        await fs.release(reader.fh)

    run(make_filesystem([store], tmp_path), body)


# ---------------------------------------------------------------------- fsync and close
async def publish_failed(fs: FileSystem, store: MemStore) -> tuple[int, Writer]:
    """A new image written and flushed once, its commit refused: its handle and writer."""
    opened, _ = await fs.create(sino(fs), "img", MODE, NEW, ME)
    await fs.write(opened.fh, 0, b"a" * 1000)
    store.failures["commit"] = BackendError("commit refused (simulated)")
    await refused(errno.EIO, fs.flush(opened.fh))
    w = fs.handles.get(opened.fh).writer
    assert w is not None
    return opened.fh, w


def test_a_failed_direct_publish_never_publishes_zeros_later(tmp_path: Path) -> None:
    store = MemStore(random_write=True)

    async def body(fs: FileSystem) -> None:
        fh, w = await publish_failed(fs, store)
        assert w.state is WriterState.LOST
        await fs.write(fh, 1000, b"b")
        await refused(errno.EIO, fs.flush(fh))
        await fs.release(fh)

    run(make_filesystem([store], tmp_path), body)
    assert not store.objects


def test_a_failed_spool_publish_keeps_the_bytes_for_the_next_close(tmp_path: Path) -> None:
    store = MemStore()

    async def body(fs: FileSystem) -> None:
        fh, w = await publish_failed(fs, store)
        assert w.state is WriterState.PUBLISH_FAILED and w.doomed
        await fs.write(fh, 1000, b"b")
        assert w.state is WriterState.OPEN
        await fs.flush(fh)
        await fs.release(fh)

    run(make_filesystem([store], tmp_path), body)
    assert store.objects["img"].data == b"a" * 1000 + b"b"


@STRATEGIES
def test_discard_drops_the_pending_bytes_and_keeps_the_published_image(
        tmp_path: Path, random_write: bool) -> None:
    store = MemStore(random_write=random_write)

    async def body(fs: FileSystem) -> None:
        ino = await new_image(fs, "img", b"kept")
        opened = await fs.open(ino, os.O_WRONLY | os.O_TRUNC, ME)
        await fs.write(opened.fh, 0, b"dropped")
        await fs.setxattr(ino, "user.imagefs.discard", "1")
        await refused(errno.EIO, fs.write(opened.fh, 0, b"later"))
        await fs.flush(opened.fh)
        await fs.release(opened.fh)

    run(make_filesystem([store], tmp_path), body)
    assert store.objects["img"].data == b"kept"


# ---------------------------------------------------------------------- who may do what
def test_a_read_only_store_refuses_every_change(tmp_path: Path) -> None:
    store = MemStore(read_only=True)
    store.put("img", b"ro", {})

    async def body(fs: FileSystem) -> None:
        ino = (await fs.lookup(sino(fs), "img")).ino
        s = sino(fs)
        for call in (fs.create(s, "new", MODE, NEW, ME), fs.open(ino, os.O_WRONLY, ME),
                     fs.open(ino, os.O_RDONLY | os.O_TRUNC, ME),
                     fs.setattr(ino, AttrChange(size=0)), fs.setattr(ino, AttrChange(mode=0o600)),
                     fs.setattr(ino, AttrChange(mtime_ns=0)), fs.setattr(ino, AttrChange(uid=0)),
                     fs.setattr(s, AttrChange(mode=0o700)), fs.unlink(s, "img"),
                     fs.rename(s, "img", s, "other", ME),
                     fs.setxattr(ino, "user.imagefs.checksum", "0")):
            await refused(errno.EROFS, call)
        assert (await fs.getattr(ino)).mode & 0o222 == 0

    run(make_filesystem([store], tmp_path), body)
    assert set(store.objects) == {"img"} and store.objects["img"].data == b"ro"


def test_create_exclusive_of_an_existing_image_is_eexist(tmp_path: Path) -> None:
    store = MemStore()

    async def body(fs: FileSystem) -> None:
        await new_image(fs, "img", b"x")
        await refused(errno.EEXIST, fs.create(sino(fs), "img", MODE, NEW | os.O_EXCL, ME))

    run(make_filesystem([store], tmp_path), body)


def test_hostile_names_are_refused_before_any_backend_call(tmp_path: Path) -> None:
    store = MemStore()
    store.failures["read"] = AssertionError("no backend call expected")

    async def body(fs: FileSystem) -> None:
        s = sino(fs)
        await refused(errno.ENAMETOOLONG, fs.create(s, "é" * 128, MODE, NEW, ME))
        for name in ("", "..", "a/b", ".imagefs-upload"):
            await refused(errno.EINVAL, fs.create(s, name, MODE, NEW, ME))
            await refused(errno.ENOENT, fs.lookup(s, name))
        await refused(errno.ENOTDIR, fs.lookup(fs.inodes.default_link, "x"))

    run(make_filesystem([store], tmp_path), body)
    assert not store.objects


def test_errors_of_a_vanished_version_are_eio_not_enoent(tmp_path: Path) -> None:
    """read(2) has no ENOENT: a descriptor whose bytes are gone reads as EIO."""
    store = MemStore()

    async def body(fs: FileSystem) -> None:
        ino = await new_image(fs, "img", b"z" * 100)
        reader = await fs.open(ino, os.O_RDONLY, ME)
        del store.objects["img"]
        await refused(errno.EIO, fs.read(reader.fh, 0, 100))
        await fs.release(reader.fh)
        await refused(errno.ENOENT, fs.lookup(sino(fs), "gone"))
        with pytest.raises(FsError):
            await fs.read(reader.fh, 0, 1)  # released: EBADF

    run(make_filesystem([store], tmp_path), body)
