"""Orders of FUSE requests a real kernel can deliver, driven without a kernel on ImageFS.

The kernel sends RELEASE after close() has returned; a process that reopens at once (fsx -c,
qemu-img) can have its OPEN handled while that RELEASE still publishes and drops its spool.
A backend call held open by a gate makes each window wide enough to hit every time.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyfuse3
import pytest
import trio

from tests.memstore import CTX, Gate, MemStore, make_fs


async def _wait(event: Any) -> None:
    """Wait for a threading.Event set by a store call in a worker thread."""
    while not event.is_set():
        await trio.sleep(0.005)


@pytest.mark.parametrize("random_write", [False, True], ids=["spool", "direct"])
def test_open_during_the_last_release_waits_and_starts_from_what_it_published(
        tmp_path: Path, random_write: bool) -> None:
    store = MemStore(random_write=random_write)
    fs = make_fs(store, tmp_path)
    sino = fs.inodes.store_ino["m"]
    got: dict[str, Any] = {}

    async def main() -> None:
        async with trio.open_nursery() as n:
            fs.bind(n)
            fi, attr = await fs.create(sino, b"img", stat.S_IFREG | 0o644,
                                       os.O_RDWR | os.O_CREAT, CTX)
            await fs.write(fi.fh, 0, b"a" * 100_000)
            # The last handle goes without a FLUSH that published (a dup closed first, or a
            # FLUSH from a forked child): RELEASE publishes, held at commit.
            store.gates["commit"] = gate = Gate()
            n.start_soon(fs.release, fi.fh)
            await _wait(gate.reached)

            async def reopen() -> None:
                got["fi"] = await fs.open(attr.st_ino, os.O_RDWR, CTX)

            n.start_soon(reopen)
            await trio.sleep(0.2)
            assert "fi" not in got, "the open joined a writer whose release was under way"
            gate.open.set()
            with trio.fail_after(10):
                while "fi" not in got:
                    await trio.sleep(0.01)
            fh = got["fi"].fh
            assert await fs.read(fh, 0, 200_000) == b"a" * 100_000
            await fs.write(fh, 100_000, b"b" * 10)
            await fs.flush(fh)
            await fs.release(fh)
            n.cancel_scope.cancel()

    trio.run(main)
    assert store.objects["img"].data == b"a" * 100_000 + b"b" * 10


def test_truncate_by_path_during_the_last_release_applies_to_the_published_image(
        tmp_path: Path) -> None:
    store = MemStore()
    fs = make_fs(store, tmp_path)
    sino = fs.inodes.store_ino["m"]

    async def main() -> None:
        async with trio.open_nursery() as n:
            fs.bind(n)
            fi, attr = await fs.create(sino, b"img", stat.S_IFREG | 0o644,
                                       os.O_RDWR | os.O_CREAT, CTX)
            await fs.write(fi.fh, 0, b"x" * 5000)
            store.gates["commit"] = gate = Gate()
            n.start_soon(fs.release, fi.fh)
            await _wait(gate.reached)
            a = pyfuse3.EntryAttributes()
            a.st_size = 1000
            fields = SimpleNamespace(update_size=True, update_mode=False, update_mtime=False,
                                     update_uid=False, update_gid=False)
            async with trio.open_nursery() as inner:
                inner.start_soon(fs.setattr, attr.st_ino, a, fields, None, CTX)
                await trio.sleep(0.2)
                del store.gates["commit"]
                gate.open.set()
            n.cancel_scope.cancel()

    trio.run(main)
    assert store.objects["img"].data == b"x" * 1000


def test_a_late_stream_failure_after_publish_does_not_fail_a_later_fsync(
        tmp_path: Path) -> None:
    """A write below the high-water mark stops streaming while a chunk is in flight; the
    publish uploads from the spool. That chunk's failure against the aborted stream upload
    must not surface later as an fsync error."""
    store = MemStore()
    fs = make_fs(store, tmp_path)
    sino = fs.inodes.store_ino["m"]

    async def main() -> None:
        async with trio.open_nursery() as n:
            fs.bind(n)
            fi, _ = await fs.create(sino, b"img", stat.S_IFREG | 0o644,
                                    os.O_RDWR | os.O_CREAT, CTX)
            store.gates["write"] = gate = Gate()
            await fs.write(fi.fh, 0, b"s" * 300_000)  # streaming starts; its write is held
            await _wait(gate.reached)
            await fs.write(fi.fh, 10, b"R")  # not in order: the spool is the truth now
            async with trio.open_nursery() as inner:
                inner.start_soon(fs.flush, fi.fh)
                await trio.sleep(0.2)
                del store.gates["write"]
                gate.open.set()
            await fs.write(fi.fh, 300_000, b"t")
            await fs.fsync(fi.fh, False)  # no stale stream error
            await fs.flush(fi.fh)
            await fs.release(fi.fh)
            n.cancel_scope.cancel()

    trio.run(main)
    want = bytearray(b"s" * 300_000)
    want[10:11] = b"R"
    assert store.objects["img"].data == bytes(want) + b"t"
