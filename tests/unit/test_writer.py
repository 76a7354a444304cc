"""The two write strategies and the writer's states, driven directly over MemStore.

``DirectWriter`` writes into a random-write upload, ``SpoolWriter`` into a local spool streamed
in order; both must publish the same bytes for the same writes, and move between the same
states (imagefs.writer.WriterState) on the same failures.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from imagefs import writer_spool
from imagefs.hashing import META_VALUE
from imagefs.stores.base import BackendError, ImageInfo
from imagefs.upload_queue import Budget
from imagefs.writer import Writer, WriterSettings, WriterState
from imagefs.writer_direct import DirectWriter
from imagefs.writer_spool import SpoolWriter
from tests.memstore import Gate, MemStore

STRATEGIES = pytest.mark.parametrize("random_write", [False, True], ids=["spool", "direct"])
MODE = stat.S_IFREG | 0o644


def drive(store: MemStore, tmp_path: Path, base: ImageInfo | None,
          body: Callable[[Writer], Awaitable[None]], **settings: Any) -> None:
    """Run ``body`` on a writer of ``store``'s kind for image "img" starting from ``base``."""
    ws = WriterSettings(spool_dir=tmp_path, hash_algo="sha512", **settings)
    cls = DirectWriter if store.random_write else SpoolWriter

    async def main() -> None:
        async with trio.open_nursery() as n:
            w = cls(store, "img", base, MODE, ws, n)
            with trio.fail_after(10):
                try:
                    await body(w)
                finally:
                    await w.discard()
            n.cancel_scope.cancel()

    trio.run(main)


@STRATEGIES
def test_a_partial_rewrite_keeps_the_rest_of_the_published_bytes(tmp_path: Path,
                                                                 random_write: bool) -> None:
    store = MemStore(random_write=random_write)
    base = store.put("img", b"x" * 10_000, {})

    async def body(w: Writer) -> None:
        assert not w.dirty and w.state is WriterState.OPEN
        assert await w.read(9_990, 100) == b"x" * 10  # unseeded: the published bytes
        await w.write(100, b"yy")
        assert w.dirty
        assert await w.read(98, 6) == b"xxyyxx"
        info = await w.publish()
        assert info is not None and w.published == info and not w.dirty
        assert await w.publish() is None  # nothing new

    drive(store, tmp_path, base, body)
    assert store.objects["img"].data == b"x" * 100 + b"yy" + b"x" * 9_898


@STRATEGIES
def test_both_strategies_publish_the_same_bytes_and_hashes(tmp_path: Path,
                                                           random_write: bool) -> None:
    """Out of order, a hole, a shrink and a regrow: what a local file would hold."""
    store = MemStore(random_write=random_write)
    want = bytearray(300_000)
    steps = [(0, b"a" * 100_000), (250_000, b"c" * 50_000), (50_000, b"b" * 10)]

    async def body(w: Writer) -> None:
        for off, data in steps:
            await w.write(off, data)
            want[off:off + len(data)] = data
        await w.truncate(260_000)
        await w.truncate(300_000)
        want[260_000:] = bytes(40_000)
        await w.publish()

    drive(store, tmp_path, None, body)
    assert store.objects["img"].data == bytes(want)
    assert META_VALUE in store.objects["img"].meta


def test_a_truncate_to_zero_reads_nothing_of_the_published_image(tmp_path: Path) -> None:
    """``dd`` truncates first: seeding fetches only what the truncate keeps."""
    store = MemStore()
    base = store.put("img", b"x" * 10_000, {})
    store.failures["read"] = AssertionError("the published bytes were fetched")

    async def body(w: Writer) -> None:
        await w.truncate(0)
        await w.write(0, b"new")
        await w.publish()

    drive(store, tmp_path, base, body)
    assert store.objects["img"].data == b"new"


BEHIND = pytest.mark.parametrize("behind", [0, 16 << 20], ids=["through", "behind"])


@BEHIND
def test_a_failed_write_loses_the_pending_image_for_good(tmp_path: Path, behind: int) -> None:
    """Written through, the write itself fails; queued (write-behind), the next call does.
    Either way every later write, the publish and reads fail: nothing is published."""
    store = MemStore(random_write=True)

    async def body(w: Writer) -> None:
        await w.write(0, b"a" * 10)
        await w.sync()
        store.failures["write"] = BackendError("write refused (simulated)")
        if behind:
            await w.write(10, b"b" * 10)  # queued: its failure is the next call's
            with pytest.raises(BackendError, match="refused"):
                await w.sync()
        else:
            with pytest.raises(BackendError, match="refused"):
                await w.write(10, b"b" * 10)
        assert w.state is WriterState.LOST and w.lost and w.doomed
        with pytest.raises(BackendError):
            await w.write(20, b"c")  # the store would take it, the image is not whole
        assert w.state is WriterState.LOST
        with pytest.raises(BackendError, match="earlier write failed"):
            await w.publish()
        with pytest.raises(BackendError):
            await w.read(0, 10)

    drive(store, tmp_path, None, body, write_budget=Budget(behind))
    assert not store.objects


def test_queued_writes_stay_within_the_budget_and_publish_in_order(tmp_path: Path) -> None:
    """With the store stalled, writes queue until the budget is full; the next one waits
    (written in its turn, not queued past the budget). Released, everything lands in order
    and the hashes are those of the bytes."""
    import hashlib

    store = MemStore(random_write=True)
    gate = store.gates["write"] = Gate()
    pieces = [bytes([65 + i]) * 10 for i in range(5)]

    async def body(w: Writer) -> None:
        budget = w.settings.write_budget
        await w.write(0, pieces[0])  # queued, its store write held at the gate
        await w.write(10, pieces[1])
        assert budget.used == 20
        done = trio.Event()

        async def third() -> None:
            await w.write(20, pieces[2])
            done.set()

        async with trio.open_nursery() as n:
            n.start_soon(third)
            await trio.sleep(0.1)
            assert not done.is_set() and budget.used <= budget.max_bytes
            gate.open.set()
        for i in (3, 4):
            await w.write(10 * i, pieces[i])
        await w.publish()
        assert budget.used == 0

    drive(store, tmp_path, None, body, write_budget=Budget(20))
    img = store.objects["img"]
    assert img.data == b"".join(pieces)
    assert img.meta[META_VALUE] == hashlib.sha512(b"".join(pieces)).hexdigest()


@STRATEGIES
def test_a_failed_publish_states(tmp_path: Path, random_write: bool) -> None:
    """Direct: the aborted upload held the bytes, LOST. Spool: the spool still has them,
    PUBLISH_FAILED until the next change, which a later publish then completes."""
    store = MemStore(random_write=random_write)

    async def body(w: Writer) -> None:
        await w.write(0, b"a" * 1000)
        store.failures["commit"] = BackendError("commit refused (simulated)")
        with pytest.raises(BackendError):
            await w.publish()
        assert w.doomed and w.dirty
        if random_write:
            assert w.state is WriterState.LOST
            return
        assert w.state is WriterState.PUBLISH_FAILED
        await w.write(1000, b"b")
        assert w.state is WriterState.OPEN and not w.doomed
        await w.publish()

    drive(store, tmp_path, None, body)
    assert store.objects.get("img") is None if random_write else \
        store.objects["img"].data == b"a" * 1000 + b"b"


@STRATEGIES
def test_cancel_drops_everything_and_refuses_later_writes(tmp_path: Path,
                                                          random_write: bool) -> None:
    store = MemStore(random_write=random_write)

    async def body(w: Writer) -> None:
        await w.write(0, b"a" * 1000)
        await w.cancel()
        assert w.state is WriterState.CANCELLED and not w.dirty and w.lost
        with pytest.raises(BackendError, match="discarded"):
            await w.write(0, b"b")
        assert await w.publish() is None

    drive(store, tmp_path, None, body)
    assert not store.objects


@BEHIND
def test_a_write_failing_after_cancel_leaves_the_writer_cancelled(tmp_path: Path,
                                                                 behind: int) -> None:
    """``user.imagefs.discard`` while a write is at the backend, which then fails: the writer
    stays cancelled (it does not become merely lost), so later writes are still refused.
    Queued, the write returned before; the discard waits for it before aborting."""
    store = MemStore(random_write=True)
    gate = store.gates["write"] = Gate()

    async def body(w: Writer) -> None:
        async def failing_write() -> None:
            if behind:
                await w.write(0, b"a" * 10)
                return
            with pytest.raises(BackendError):
                await w.write(0, b"a" * 10)

        async with trio.open_nursery() as n:
            n.start_soon(failing_write)
            while not gate.reached.is_set():
                await trio.sleep(0.005)
            store.failures["write"] = BackendError("write refused (simulated)")
            n.start_soon(w.cancel)
            await trio.sleep(0.05)
            gate.open.set()
        assert w.state is WriterState.CANCELLED
        with pytest.raises(BackendError, match="discarded"):
            await w.write(0, b"b")
        assert await w.publish() is None

    drive(store, tmp_path, None, body, write_budget=Budget(behind))
    assert not store.objects


def test_spool_streams_in_order_and_falls_back_to_a_whole_upload(tmp_path: Path) -> None:
    """A write below the high-water mark stops streaming; publish sends the whole spool."""
    store = MemStore()
    uploads: list[int] = []
    real = store.upload

    def counting(name: str, size_hint: int | None = None) -> object:
        uploads.append(1)
        return real(name, size_hint)

    store.upload = counting  # type: ignore[method-assign]

    async def body(w: Writer) -> None:
        await w.write(0, b"s" * 100_000)
        await w.sync()  # the stream has sent it all
        assert len(uploads) == 1
        await w.write(5, b"R")
        await w.publish()
        assert len(uploads) == 2

    drive(store, tmp_path, None, body)
    assert store.objects["img"].data == b"s" * 5 + b"R" + b"s" * 99_994


def test_a_stream_failure_surfaces_at_fsync_and_the_spool_still_publishes(
        tmp_path: Path) -> None:
    store = MemStore()

    async def body(w: Writer) -> None:
        store.failures["write"] = BackendError("PUT part: HTTP 503 (simulated)")
        await w.write(0, b"q" * 1000)
        with pytest.raises(BackendError, match="upload failed"):
            await w.sync()
        assert w.state is WriterState.OPEN  # nothing is lost: the spool has every byte
        await w.publish()

    drive(store, tmp_path, None, body)
    assert store.objects["img"].data == b"q" * 1000


def test_a_trimmed_spool_refuses_to_go_back(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Past ``spool_trim_after`` the sent head is dropped: a write before the end is EIO
    (logged) and the pending image is lost, never published with wrong bytes; writes at the
    end publish whole."""
    chunk = 64 << 10  # trimming goes in steps of 16 chunks: small ones keep this quick
    monkeypatch.setattr(writer_spool, "CHUNK", chunk)

    async def in_order(w: Writer) -> None:
        for i in range(17):
            await w.write(i * chunk, bytes([i]) * chunk)
        await w.sync()
        assert isinstance(w, SpoolWriter) and w._trimmed > 0

    async def at_the_end(w: Writer) -> None:
        await in_order(w)
        await w.write(17 * chunk, b"end")
        await w.publish()

    async def going_back(w: Writer) -> None:
        await in_order(w)
        with pytest.raises(BackendError, match="trimmed"):
            await w.write(0, b"x")
        assert w.state is WriterState.LOST
        with pytest.raises(BackendError):
            await w.publish()

    whole, lost = MemStore(), MemStore()
    drive(whole, tmp_path, None, at_the_end, spool_trim_after=chunk)
    drive(lost, tmp_path, None, going_back, spool_trim_after=chunk)
    data = whole.objects["img"].data
    assert len(data) == 17 * chunk + 3 and data[16 * chunk] == 16 and data.endswith(b"end")
    assert not lost.objects


def test_discard_waits_for_a_chunk_in_flight(tmp_path: Path) -> None:
    """A chunk still streaming when the writer is discarded ends before discard returns."""
    store = MemStore()
    gate = store.gates["write"] = Gate()

    async def body(w: Writer) -> None:
        await w.write(0, b"g" * 1000)
        while not gate.reached.is_set():
            await trio.sleep(0.005)
        async with trio.open_nursery() as n:
            n.start_soon(w.discard)
            await trio.sleep(0.05)
            gate.open.set()

    drive(store, tmp_path, None, body)
    assert not store.objects and not os.listdir(tmp_path)


def _glance_hashes(data: bytes) -> dict[str, str]:
    import hashlib

    return {"os_hash_algo": "sha512", "os_hash_value": hashlib.sha512(data).hexdigest(),
            "checksum": hashlib.md5(data).hexdigest()}


@pytest.mark.parametrize("inline_max", [0, 64 << 20], ids=["background", "inline"])
def test_a_seeded_image_is_hashed_only_when_a_write_appends_to_it(tmp_path: Path,
                                                                  inline_max: int) -> None:
    """An append hashes the published bytes it continues, in order, and the close publishes
    the right hashes without reading the image back; an overwrite (qemu-img convert's
    reopen) never hashes the seed: the close hashes the upload, or leaves it to the
    background hasher past inline_max."""
    store = MemStore(random_write=True)
    base = store.put("img", b"x" * 300_000, {})

    async def append(w: Writer) -> None:
        await w.write(300_000, b"y" * 1000)
        store.failures["read"] = AssertionError("the image was read back at close")
        await w.publish()

    drive(store, tmp_path, base, append, hash_inline_max=inline_max)
    want = b"x" * 300_000 + b"y" * 1000
    assert store.objects["img"].data == want
    assert {k: store.objects["img"].meta.get(k) for k in _glance_hashes(want)} == \
        _glance_hashes(want)
    store.failures.clear()

    base = store.stat("img")

    async def overwrite(w: Writer) -> None:
        await w.write(1000, b"z" * 1000)
        await w.write(0, b"w" * 10)
        assert w._hasher.offset == 0, "the seed was hashed"  # type: ignore[attr-defined]
        await w.publish()

    drive(store, tmp_path, base, overwrite, hash_inline_max=inline_max)
    want = b"w" * 10 + b"x" * 990 + b"z" * 1000 + b"x" * 298_000 + b"y" * 1000
    assert store.objects["img"].data == want
    meta = store.objects["img"].meta
    if inline_max:
        assert {k: meta.get(k) for k in _glance_hashes(want)} == _glance_hashes(want)
    else:
        assert META_VALUE not in meta  # published first, hashed by the background hasher
