"""MemoryBudget: the per-store bound on upload buffers, whatever the number of uploads."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from imagefs.stores.base import BackendError
from imagefs.stores.budget import MemoryBudget


def test_try_take_never_exceeds_the_limit_and_counts_refusals() -> None:
    b = MemoryBudget(10, "t")
    assert b.try_take(6)
    assert not b.try_take(5)
    assert b.try_take(4)
    assert (b.used, b.peak, b.refused) == (10, 10, 1)
    b.give(6)
    b.give(4)
    assert b.used == 0 and b.peak == 10


def test_take_waits_for_room_given_back_by_another_thread() -> None:
    b = MemoryBudget(8, "t")
    b.take(8, timeout=1)
    threading.Timer(0.2, b.give, args=(5,)).start()
    t0 = time.monotonic()
    b.take(5, timeout=10)
    assert time.monotonic() - t0 >= 0.1
    assert b.used == 8 and b.peak == 8


def test_take_times_out_with_a_backend_error() -> None:
    b = MemoryBudget(4, "store x")
    b.take(4, timeout=1)
    with pytest.raises(BackendError, match="store x: upload memory"):
        b.take(1, timeout=0.1)
    assert b.used == 4


def test_a_request_larger_than_the_budget_is_granted_alone() -> None:
    """It cannot be split; refusing it forever would hang its writer."""
    b = MemoryBudget(4, "t")
    b.take(9, timeout=0.1)
    assert b.used == 9
    with pytest.raises(BackendError):
        b.take(1, timeout=0.05)
    b.give(9)
    assert b.used == 0


def test_buffer_pool_reuses_buffers_within_the_budget_and_frees_them_at_the_last_end() -> None:
    from imagefs.stores.budget import BufferPool

    b = MemoryBudget(40, "t")
    pool = BufferPool(b, keep=2)
    pool.begin()
    pool.begin()
    first, second, third = pool.get(10), pool.get(10), pool.get(10)
    assert first is not None and second is not None and third is not None
    assert b.used == 30
    assert pool.get(20) is None, "the budget has 10 left: no 20-byte buffer"
    pool.put(first, 10)
    pool.put(second, 10)
    pool.put(third, 10)  # beyond `keep`: freed at once
    assert (b.used, pool.kept) == (20, 20)
    again = pool.get(10)
    assert again is first or again is second, "a kept buffer was not reused"
    assert b.used == 20  # already charged: reusing takes nothing more
    del again[4:]  # a last part cut to its length: freed, not kept
    pool.put(again, 10)
    assert (b.used, pool.kept) == (10, 10)
    pool.end()
    assert (b.used, pool.kept) == (10, 10), "an upload still runs: buffers stay kept"
    pool.end()
    assert (b.used, pool.kept) == (0, 0)
    late = bytearray(10)
    b.take(10, timeout=1)
    pool.put(late, 10)  # a part in flight finishing after the last upload ended
    assert (b.used, pool.kept) == (0, 0)


def test_part_reads_the_spool_straight_into_its_buffer(tmp_path: Any) -> None:
    """Part.read_from: the bytes of the file, zeros past its end, fed in order; a reused
    buffer holds nothing of the previous part; the last part is cut to its length."""
    import hashlib
    import os

    from imagefs.stores.budget import BufferPool
    from imagefs.stores.s3.upload import Part

    data = os.urandom(5000)
    path = tmp_path / "spool"
    path.write_bytes(data)
    b = MemoryBudget(1 << 20, "t")
    pool = BufferPool(b, keep=2)
    pool.begin()
    fd = os.open(path, os.O_RDONLY)
    try:
        fed = hashlib.sha256()
        one = Part(1, 4096, pool)
        assert one.read_from(fd, 0, 3000, fed.update) == 3000
        assert one.read_from(fd, 3000, 9000, fed.update) == 1096
        assert one.full and bytes(one.body()) == data[:4096]
        one.release()
        two = Part(2, 4096, pool)  # the same buffer again, still holding part 1's bytes
        assert two.read_from(fd, 4096, 4000, fed.update) == 4000  # 904 bytes, then zeros
        body = bytes(two.body())
        assert body == data[4096:] + bytes(4000 - 904)
        assert fed.digest() == hashlib.sha256(data + bytes(4000 - 904)).digest()
        two.release()
        assert (b.used, pool.kept) == (0, 0), "the cut buffer was kept"
        with_file = Part(3, 4096, None)  # no room in memory: an unlinked temporary file
        assert with_file.read_from(fd, 100, 50, lambda _v: None) == 50
        assert with_file.body().read() == data[100:150]
        with_file.release()
    finally:
        os.close(fd)
        pool.end()
    assert b.used == 0
