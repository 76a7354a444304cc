"""BackgroundHasher: versions that are being changed wait; replaced versions are dropped."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable

import trio

from imagefs.background_hash import BackgroundHasher
from imagefs.hashing import META_VALUE
from imagefs.stores.base import ImageInfo, Store
from tests.memstore import MemStore


def _hasher(changing: dict[str, bool], done: list[str]) -> BackgroundHasher:
    def on_done(_store: Store, info: ImageInfo) -> None:
        done.append(info.name)

    return BackgroundHasher("sha512", 1 << 30, lambda _s, _n: 30.0, on_done,
                            lambda _sid, name: changing.get(name, False), defer=0.05)


def _run(h: BackgroundHasher, body: Callable[[], Awaitable[None]]) -> None:
    """``body`` with the hasher's task running beside it."""
    async def main() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(h.run)
            with trio.fail_after(10):
                await body()
            n.cancel_scope.cancel()

    trio.run(main)


async def _until(done: list[str]) -> None:
    while not done:
        await trio.sleep(0.01)


def test_an_image_being_changed_is_hashed_once_its_writer_is_done() -> None:
    store = MemStore()
    data = b"q" * 9_000_000  # three chunks: the writer shows up between them
    info = store.put("img", data, {})
    changing: dict[str, bool] = {}
    done: list[str] = []
    reads: list[int] = []
    real_read = store.read_range

    def read_range(name: str, version: str, offset: int, length: int) -> bytes:
        reads.append(offset)
        changing["img"] = len(reads) == 1 or changing.get("img", False)
        return real_read(name, version, offset, length)

    store.read_range = read_range  # type: ignore[method-assign]
    h = _hasher(changing, done)

    async def body() -> None:
        h.submit(store, info)
        await trio.sleep(0.3)
        assert h.deferred >= 1 and not done, "hashed while a writer was changing it"
        assert reads == [0], "kept reading an image being changed"
        changing["img"] = False
        await _until(done)

    _run(h, body)
    assert store.objects["img"].meta[META_VALUE] == hashlib.sha512(data).hexdigest()
    assert h.pending == {}


def test_a_version_replaced_while_put_off_is_never_hashed() -> None:
    store = MemStore()
    old = store.put("img", b"a" * 1000, {})
    changing = {"img": True}
    done: list[str] = []
    h = _hasher(changing, done)

    async def body() -> None:
        h.submit(store, old)
        await trio.sleep(0.2)
        new = store.put("img", b"b" * 1000, {})
        changing["img"] = False
        h.submit(store, new)
        await _until(done)
        await trio.sleep(0.2)  # the old job's next look comes and goes

    _run(h, body)
    assert done == ["img"]
    assert store.objects["img"].meta[META_VALUE] == hashlib.sha512(b"b" * 1000).hexdigest()
    assert h.pending == {}
