"""The read path without a kernel: runs of blocks per request, prefetch bounds, exactness.

Backend requests are counted on an in-memory store (tests/memstore.py); the integration tests
count them at a real server (nginx) through a real mount.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

import trio

from imagefs.cache import BlockCache, MemoryCache
from imagefs.reader import BlockSource, Reader, exact_chunks
from tests.memstore import MemStore
from tests.unit.test_cache import flip_byte

MiB = 1 << 20


class Recorder(MemStore):
    """Counts read requests and watches how many prefetched blocks are in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[int, int]] = []
        self.source: BlockSource | None = None
        self.min_tokens = 1 << 30

    def read_range(self, name: str, version: str, offset: int, length: int) -> bytes:
        self.requests.append((offset, length))
        if self.source is not None:
            self.min_tokens = min(self.min_tokens, self.source.tokens)
        return super().read_range(name, version, offset, length)


def _run(store: Recorder, data: bytes, reads: list[list[tuple[int, int]]],
         readahead: int = 8 * MiB, prefetch: int = 128 * MiB, memory: int = 256 * MiB,
         fetch_size: int = 16 * MiB) -> dict[str, Any]:
    info = store.put("img", data, {})
    out: dict[str, Any] = {}

    async def main() -> None:
        async with trio.open_nursery() as n:
            src = BlockSource(BlockCache(MemoryCache(memory), None), MiB, prefetch, n,
                              fetch_size=fetch_size)
            store.source = src
            r = Reader(src, store, info, readahead)

            async def one(off: int, size: int) -> None:
                got = await r.read(off, size)
                assert bytes(got) == data[off:off + size], f"wrong bytes at {off}"

            for group in reads:  # the reads of a group are in flight together
                async with trio.open_nursery() as g:
                    for off, size in group:
                        g.start_soon(one, off, size)
            await trio.sleep(0.05)  # let prefetches that are still running land
            out["tokens"] = (src.tokens, src.max_tokens)
            n.cancel_scope.cancel()

    trio.run(main)
    return out


def _fetched(store: Recorder) -> list[int]:
    """How many times each byte offset (in MiB) was fetched."""
    counts: dict[int, int] = {}
    for off, n in store.requests:
        for b in range(off // MiB, (off + n + MiB - 1) // MiB):
            counts[b] = counts.get(b, 0) + 1
    return [counts.get(b, 0) for b in range(max(counts) + 1)] if counts else []


def test_a_sequential_read_fetches_each_block_once_in_few_requests() -> None:
    store = Recorder()
    data = os.urandom(40 * MiB + 1234)
    reads = [[(off, 256 << 10)] for off in range(0, len(data), 256 << 10)]
    out = _run(store, data, reads, readahead=64 * MiB)
    assert _fetched(store) == [1] * 41
    assert len(store.requests) <= 12, store.requests  # runs, not one request per block
    assert max(n for _, n in store.requests) <= 16 * MiB
    assert out["tokens"][0] == out["tokens"][1]  # every prefetch token came back


def test_reads_answered_out_of_order_still_count_as_sequential() -> None:
    """The kernel's read-ahead keeps several 1 MiB requests in flight; they arrive in any
    order. Still each block once, still prefetched in runs."""
    store = Recorder()
    data = os.urandom(32 * MiB)
    rng = random.Random(3)
    offsets = list(range(0, len(data), MiB))
    groups = []
    for i in range(0, len(offsets), 4):
        g = [(o, MiB) for o in offsets[i:i + 4]]
        rng.shuffle(g)
        groups.append(g)
    _run(store, data, groups)
    assert _fetched(store) == [1] * 32
    assert len(store.requests) < 16, store.requests


def test_random_reads_fetch_only_what_they_touch() -> None:
    store = Recorder()
    data = os.urandom(256 * MiB)
    rng = random.Random(5)
    offs = [rng.randrange(0, len(data) - 65536) & ~4095 for _ in range(40)]
    _run(store, data, [[(o, 65536)] for o in offs])
    touched = {b for o in offs for b in range(o // MiB, (o + 65535) // MiB + 1)}
    fetched = {i for i, c in enumerate(_fetched(store)) if c}
    assert fetched == touched  # no prefetch for a random pattern


def test_a_run_never_spans_a_cached_block() -> None:
    """Blocks 0-2 where block 1 is already cached: blocks 0 and 2 come from two requests
    (one request for both would hand block 1's bytes to block 2)."""
    store = Recorder()
    data = os.urandom(8 * MiB)
    info = store.put("img", data, {})

    async def main() -> list[bytes]:
        async with trio.open_nursery() as n:
            src = BlockSource(BlockCache(MemoryCache(64 * MiB), None), MiB, 16 * MiB, n)
            await src.blocks(store, info, 1, 1)
            got = await src.blocks(store, info, 0, 2)
            n.cancel_scope.cancel()
            return got

    got = trio.run(main)
    assert b"".join(got) == data[:3 * MiB]
    assert sorted(store.requests) == [(0, MiB), (MiB, MiB), (2 * MiB, MiB)]


def test_prefetch_stays_inside_the_mount_wide_budget() -> None:
    """Eight sequential readers at once on a 6-block budget: never more than 6 prefetched
    blocks in flight, and every token returns."""
    store = Recorder()
    data = os.urandom(24 * MiB)
    info_names = [f"img{i}" for i in range(8)]
    for name in info_names:
        store.put(name, data, {})

    async def main() -> tuple[int, int]:
        async with trio.open_nursery() as n:
            src = BlockSource(BlockCache(MemoryCache(512 * MiB), None), MiB, 6 * MiB, n)
            store.source = src

            async def reader(name: str) -> None:
                r = Reader(src, store, store.stat(name), 64 * MiB)
                for off in range(0, len(data), MiB):
                    assert bytes(await r.read(off, MiB)) == data[off:off + MiB]

            async with trio.open_nursery() as g:
                for name in info_names:
                    g.start_soon(reader, name)
            await trio.sleep(0.05)
            n.cancel_scope.cancel()
            return src.tokens, src.max_tokens

    tokens, max_tokens = trio.run(main)
    assert max_tokens == 6
    assert tokens == 6
    assert store.min_tokens >= 0


def test_exact_chunks_recuts_and_checks_the_length() -> None:
    assert list(exact_chunks([b"abc", b"defg", b"h"], 3, 8)) == [b"abc", b"def", b"gh"]
    for pieces, length in (([b"ab"], 3), ([b"abcd"], 3)):
        try:
            list(exact_chunks(pieces, 2, length))
        except Exception as e:
            assert "short" in str(e) or "more" in str(e)
        else:
            raise AssertionError("a wrong length was accepted")


def test_a_header_probe_costs_one_request() -> None:
    """``qemu-img info``: a few small reads near the start of a big image, then nothing: one
    backend request, no prefetch."""
    store = Recorder()
    data = os.urandom(64 * MiB)
    _run(store, data, [[(0, 65536)], [(0x30000, 512)], [(0x10000, 65536)], [(0x20000, 4096)]])
    assert store.requests == [(0, MiB)]


def test_a_cold_read_lands_in_the_disk_cache_and_a_warm_one_rewrites_nothing(tmp_path: Any
                                                                           ) -> None:
    """Every block of a sequential read reaches the disk cache (the write-behind threads, not
    the readers, store them); a read after a remount is served from disk with no backend
    request and no block written again."""
    from imagefs.cache import DiskCache

    store = Recorder()
    data = os.urandom(24 * MiB + 12345)
    info = store.put("img", data, {})
    puts: list[object] = []

    class CountingDisk(DiskCache):
        def put(self, key: Any, value: bytes) -> None:
            puts.append(key)
            super().put(key, value)

    def read_all() -> None:
        async def main() -> None:
            disk = CountingDisk(tmp_path / "blocks", 1 << 30)
            cache = BlockCache(MemoryCache(64 * MiB), disk)  # no eviction: one fetch each
            async with trio.open_nursery() as n:
                r = Reader(BlockSource(cache, MiB, 16 * MiB, n), store, info, 8 * MiB)
                for off in range(0, len(data), 128 << 10):
                    assert bytes(await r.read(off, 128 << 10)) == data[off:off + (128 << 10)]
                n.cancel_scope.cancel()
            await trio.to_thread.run_sync(cache.close)

        trio.run(main)

    read_all()
    nblocks = -(-len(data) // MiB)
    assert len(puts) == nblocks and len(set(puts)) == nblocks
    cold_requests = len(store.requests)
    puts.clear()
    read_all()
    assert len(store.requests) == cold_requests, "the warm read went to the backend"
    assert puts == [], "blocks read from the disk cache were written to it again"


def _read_in_4mib_reads(store: Recorder, info: Any, data: bytes, disk: Any) -> None:
    """Read the image whole in 4 MiB reads (what ``dd bs=4M`` sends) through a 16 MiB memory
    cache over ``disk``, checking every byte; the disk cache's writes finished after."""
    async def main() -> None:
        cache = BlockCache(MemoryCache(16 * MiB), disk)
        async with trio.open_nursery() as n:
            r = Reader(BlockSource(cache, MiB, 32 * MiB, n), store, info, 32 * MiB)
            for off in range(0, len(data), 4 * MiB):
                assert bytes(await r.read(off, 4 * MiB)) == data[off:off + 4 * MiB]
            n.cancel_scope.cancel()
        await trio.to_thread.run_sync(cache.close)

    trio.run(main)


def test_a_warm_read_reads_the_disk_cache_back_in_order_and_fetches_what_it_lost(
        tmp_path: Any) -> None:
    """A sequential re-read served from the disk cache reads each prefetch's blocks back in
    one ordered pass each (a block per task waited behind the later blocks of its batch
    whenever trio started the batch in reverse). A block the cache lost since the index
    listed it (here: corrupt) is fetched from the store, in one request, and the reader gets
    the right bytes."""
    from imagefs.cache import DiskCache

    store = Recorder()
    data = os.urandom(40 * MiB + 4321)
    info = store.put("img", data, {})
    runs: list[list[int]] = []

    class OrderedDisk(DiskCache):
        def get_run(self, keys: list[Any]) -> Any:
            runs.append([k[-1] for k in keys])
            return super().get_run(keys)

    _read_in_4mib_reads(store, info, data, DiskCache(tmp_path / "blocks", 1 << 30))
    cold = len(store.requests)
    slab = tmp_path / "blocks" / "slab"
    flip_byte(slab, 4096 + 20 * (4096 + MiB) + 4096 + 99)  # in the data of slot 20's block
    _read_in_4mib_reads(store, info, data, OrderedDisk(tmp_path / "blocks", 1 << 30))
    assert len(store.requests) == cold + 1, "only the corrupt block goes to the store"
    assert any(len(run) > 1 for run in runs), "prefetch read no run back from disk"
    for run in runs:
        assert run == list(range(run[0], run[0] + len(run))), f"not in order: {run}"
    read = sorted(i for run in runs for i in run)
    assert read == sorted(set(read)) and len(read) == -(-len(data) // MiB)


def test_blocks_the_disk_cache_lost_are_fetched_together(tmp_path: Any) -> None:
    """The slab lost its contents behind the index's back (truncated): every block of a
    warm read is fetched again, right, and a prefetch run's blocks in one request, not one
    request each."""
    from imagefs.cache import DiskCache

    store = Recorder()
    data = os.urandom(32 * MiB)
    info = store.put("img", data, {})

    _read_in_4mib_reads(store, info, data, DiskCache(tmp_path / "blocks", 1 << 30))
    cold = len(store.requests)
    disk = DiskCache(tmp_path / "blocks", 1 << 30)
    assert disk.contains((store.id, "img", info.version, MiB, 31))
    os.truncate(tmp_path / "blocks" / "slab", 4096)
    _read_in_4mib_reads(store, info, data, disk)
    again = len(store.requests) - cold
    assert 0 < again <= 2 * cold, f"{again} requests to fetch again what {cold} fetched"


def test_write_behind_drops_instead_of_waiting_when_its_queue_is_full(tmp_path: Any) -> None:
    """A full queue never makes the caller wait: the block is not stored, and counted."""
    import threading

    from imagefs.cache import DiskCache, WriteBehind

    release = threading.Event()

    class SlowDisk(DiskCache):
        def put(self, key: Any, value: bytes) -> None:
            release.wait(10)
            super().put(key, value)

    disk = SlowDisk(tmp_path / "blocks", 1 << 30)
    wb = WriteBehind(disk, 4 * MiB)
    block = os.urandom(MiB)
    offered = [wb.offer(("k", i), block) for i in range(10)]
    assert offered[:4] == [True] * 4 and not any(offered[4:])
    assert wb.dropped == 6
    release.set()
    assert wb.close(10)
    assert [disk.get(("k", i)) is not None for i in range(10)] == [True] * 4 + [False] * 6


class _Streaming(Recorder):
    """A backend whose replies take time to arrive (a few ms, then 1 MiB per ms): what
    makes prefetched blocks wait in memory while the reader catches up."""

    def read_chunks(self, name: str, version: str, offset: int, length: int, chunk: int
                    ) -> Any:
        self.requests.append((offset, length))
        time.sleep(0.003)
        data = self.objects[name].data
        for off in range(offset, offset + length, chunk):
            time.sleep(0.001)
            yield bytes(data[off:off + min(chunk, offset + length - off)])


def test_at_the_shipped_defaults_the_kernels_read_ahead_fetches_each_block_once() -> None:
    """The kernel keeps up to 32 1 MiB reads in flight ahead of the reading program. With
    the shipped cache settings each block is still fetched once, in runs: prefetched blocks
    are not evicted before their reader gets to them (``reader.WINDOW_SHARE``,
    ``MemoryCache.demote``)."""
    from imagefs import config

    cc = config.parse({"stores": {"a": {"type": "file", "path": "/"}}}, Path("t.toml")).cache
    store = _Streaming()
    data = os.urandom(128 * MiB)
    info = store.put("img", data, {})

    async def main() -> None:
        async with trio.open_nursery() as n:
            src = BlockSource(BlockCache(MemoryCache(cc.memory_size), None), cc.block_size,
                              cc.max_prefetch_memory, n, fetch_size=cc.fetch_size)
            r = Reader(src, store, info, cc.readahead)
            in_flight = trio.Semaphore(32)

            async def one(off: int) -> None:
                try:
                    assert bytes(await r.read(off, MiB)) == data[off:off + MiB]
                finally:
                    in_flight.release()

            async with trio.open_nursery() as kernel:
                for off in range(0, len(data), MiB):
                    await in_flight.acquire()
                    kernel.start_soon(one, off)
            n.cancel_scope.cancel()

    trio.run(main)
    assert _fetched(store) == [1] * 128
    assert len(store.requests) <= 16, " ".join(str(n // MiB) for _, n in store.requests)
