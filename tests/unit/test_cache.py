"""Block cache bounds and integrity: torn, corrupt or reused disk slots are never served."""

from __future__ import annotations

import errno
import logging
import os
import random
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Any

from imagefs.cache import DiskCache, MemoryCache
from imagefs.hashing import ImageHasher


def test_memory_cache_is_bounded() -> None:
    m = MemoryCache(10_000)
    for i in range(50):
        m.put(("k", i), bytes(1000))
    assert m.used <= 10_000
    assert m.get(("k", 49)) is not None and m.get(("k", 0)) is None


KiB = 1 << 10
SLOT = 4096 + 16 * KiB  # header page + data of a DiskCache(..., block_size=16 KiB)


def _slab(d: DiskCache) -> Path:
    return d.root / "slab"


def flip_byte(path: Path, offset: int) -> None:
    """Corrupt one byte of a file in place (it can never stay what it was)."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ 0xFF]))


def test_a_demoted_block_is_evicted_first_and_a_read_keeps_it() -> None:
    m = MemoryCache(3 * 10)
    for k in "abc":
        m.put(k, bytes(10))
    m.get("a")  # order, least recent first: b c a
    m.demote("c")  # c b a
    m.put("d", bytes(10))
    assert m.get("c") is None and m.get("b") is not None and m.used == 30
    m.demote("a")
    m.get("a")  # read again: most recent once more
    m.put("e", bytes(10))
    assert m.get("a") is not None and m.get("d") is None
    m.demote("gone")  # not there: nothing happens
    m.put("big", bytes(31))  # larger than the whole cache: not kept, nothing evicted
    assert m.get("big") is None and m.used == 30


def test_disk_cache_round_trip(tmp_path: Path) -> None:
    d = DiskCache(tmp_path, 1 << 20, block_size=16 * KiB)
    blocks = {("img", "v1", i): os.urandom(16 * KiB - i) for i in range(8)}
    for k, v in blocks.items():
        d.put(k, v)
    for k, v in blocks.items():
        assert d.contains(k) and bytes(d.get(k) or b"") == v
    assert not d.contains(("img", "v2", 0)) and d.get(("img", "v2", 0)) is None
    assert d.used == 8 * SLOT


def test_disk_cache_bounded_and_survives_restart(tmp_path: Path) -> None:
    d = DiskCache(tmp_path, 50_000)  # capacity from the first block: 16 KiB slots, 2 of them
    for i in range(20):
        d.put(("img", "v1", i), bytes([i]) * 10_000)
    assert d.used <= 50_000 and _slab(d).stat().st_size <= 50_000
    assert d.get(("img", "v1", 19)) == bytes([19]) * 10_000
    assert d.get(("img", "v1", 0)) is None
    d2 = DiskCache(tmp_path, 50_000)  # a remount finds what is still there
    assert d2.get(("img", "v1", 19)) == bytes([19]) * 10_000
    assert d2.get(("img", "v1", 18)) == bytes([18]) * 10_000
    assert d2.get(("img", "v2", 19)) is None  # another version is another key


def test_disk_cache_evicts_least_recently_used_within_max_bytes(tmp_path: Path) -> None:
    max_bytes = 4096 + 4 * SLOT
    d = DiskCache(tmp_path, max_bytes, block_size=16 * KiB)
    for i in range(4):
        d.put(i, bytes([i]) * 1000)
    assert d.get(0) is not None  # 0 is now the most recently used, 1 the least
    for i in range(4, 40):
        d.put(i, bytes([i]) * 16 * KiB)
        assert d.used <= max_bytes and _slab(d).stat().st_size <= max_bytes
        if i == 4:
            assert d.get(1) is None and d.get(0) is not None
    assert [k for k in range(40) if d.contains(k)] == [36, 37, 38, 39]
    # a restart keeps the order of the puts, and a smaller bound shrinks the file
    d2 = DiskCache(tmp_path, 4096 + 2 * SLOT, block_size=16 * KiB)
    assert _slab(d2).stat().st_size <= 4096 + 2 * SLOT and d2.used <= 4096 + 2 * SLOT
    d2.put(99, b"x")
    assert all(bytes(d2.get(k) or b"") == bytes([k]) * 16 * KiB for k in range(40)
               if d2.contains(k))
    assert d2.get(99) == b"x"


def test_disk_cache_detects_corruption(tmp_path: Path) -> None:
    """A flipped byte of data is a miss and frees the slot; so is a torn (short) slot."""
    d = DiskCache(tmp_path, 1 << 20, block_size=16 * KiB)
    key = ("img", "v1", 3)
    d.put(key, b"a" * 4096)
    d.put("other", b"o" * 4096)
    f = _slab(d)
    flip_byte(f, 4096 + 4096 + 100)  # superblock, header page of slot 0, into its data
    assert d.contains(key)
    assert d.get(key) is None
    assert not d.contains(key) and d.used == SLOT, "the corrupt slot was not freed"
    assert d.get("other") == b"o" * 4096
    d.put(key, b"b" * 4096)  # into the freed slot
    assert d.get(key) == b"b" * 4096 and f.stat().st_size == 4096 + SLOT + 4096 + 4096
    d.put("last", b"z" * 16 * KiB)
    with open(f, "r+b") as fh:  # torn write: a crash left the slot short
        fh.truncate(f.stat().st_size - 1)
    assert d.get("last") is None and not d.contains("last")
    assert d.get(key) == b"b" * 4096


def test_a_slot_reused_for_another_key_while_read_is_a_miss(tmp_path: Path,
                                                            monkeypatch: Any) -> None:
    """The index said slot 0 holds A; before the read reaches the disk, A is evicted and the
    slot rewritten with B. The read of A is a miss, not B's bytes, and B stays cached."""
    d = DiskCache(tmp_path, 4096 + SLOT, block_size=16 * KiB)  # one slot
    d.put("A", b"A" * 8192)
    real_pread = os.pread
    raced = []

    def pread(fd: int, n: int, off: int) -> bytes:
        if not raced:
            raced.append(1)
            d.put("B", b"B" * 8192)  # evicts A, reuses its slot
        return real_pread(fd, n, off)

    monkeypatch.setattr(os, "pread", pread)
    assert d.get("A") is None
    monkeypatch.setattr(os, "pread", real_pread)
    assert raced and not d.contains("A")
    assert d.get("B") == b"B" * 8192


def test_a_slot_rewritten_by_another_process_is_a_miss(tmp_path: Path) -> None:
    """Two caches on one directory (a stale mount): each one's key check refuses the
    other's block in a slot it still lists."""
    d = DiskCache(tmp_path, 4096 + SLOT, block_size=16 * KiB)
    d.put("A", b"A" * 100)
    d2 = DiskCache(tmp_path, 4096 + SLOT, block_size=16 * KiB)
    assert d2.get("A") == b"A" * 100
    d2.put("B", b"B" * 100)
    assert d.get("A") is None and d.get("B") is None and d2.get("B") == b"B" * 100


def test_blocks_larger_than_the_slots(tmp_path: Path) -> None:
    """With block_size given, a larger block is not stored; without, the slab starts afresh
    with larger slots (blocks are at most cache.block_size: once per mount at most)."""
    d = DiskCache(tmp_path / "fixed", 1 << 20, block_size=16 * KiB)
    d.put("small", b"s" * 100)
    d.put("big", b"b" * (16 * KiB + 1))
    assert not d.contains("big") and d.get("small") == b"s" * 100
    a = DiskCache(tmp_path / "auto", 1 << 20)
    a.put("tail", b"t" * 5000)  # an image's short last block came first: 8 KiB slots
    a.put("big", b"b" * (16 * KiB))
    assert a.get("big") == b"b" * 16 * KiB and not a.contains("tail")
    a.put("tail", b"t" * 5000)
    assert a.get("tail") == b"t" * 5000 and a.used == 2 * SLOT
    assert DiskCache(tmp_path / "auto", 1 << 20).get("big") == b"b" * 16 * KiB
    # another block size at the next mount: the old slab is not read with the new geometry
    assert DiskCache(tmp_path / "auto", 1 << 20, block_size=8 * KiB).used == 0
    assert DiskCache(tmp_path / "auto", 1 << 20, block_size=16 * KiB).get("big") is None
    assert DiskCache(tmp_path / "tiny", 8000).contains("x") is False  # no room for one slot
    t = DiskCache(tmp_path / "tiny", 8000)
    t.put("x", b"x" * 5000)
    assert t.get("x") is None and t.used == 0


def test_old_layout_block_files_are_removed_at_startup(tmp_path: Path) -> None:
    """Operators upgrade in place: block files of the one-file-per-block layout (and its .tmp
    files) are removed, so they neither break startup nor hold disk beyond max_bytes."""
    for h in ("ab" + "0" * 62, "cd" + "1" * 62):
        sub = tmp_path / h[:2]
        sub.mkdir()
        (sub / h).write_bytes(os.urandom(20_000))
        (sub / f"{h}.1234.tmp").write_bytes(b"torn")
    (tmp_path / "unrelated").mkdir()
    d = DiskCache(tmp_path, 1 << 20, block_size=16 * KiB)
    assert d.used == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slab", "unrelated"]
    d.put("k", b"v" * 100)
    assert DiskCache(tmp_path, 1 << 20, block_size=16 * KiB).get("k") == b"v" * 100


def test_a_damaged_slab_is_started_afresh(tmp_path: Path) -> None:
    d = DiskCache(tmp_path, 1 << 20, block_size=16 * KiB)
    d.put("k", b"v" * 100)
    with open(_slab(d), "r+b") as fh:
        fh.write(b"garbage!")  # the superblock
    d2 = DiskCache(tmp_path, 1 << 20, block_size=16 * KiB)
    assert d2.used == 0 and d2.get("k") is None
    d2.put("k", b"w" * 100)
    assert d2.get("k") == b"w" * 100


def test_bytes_from_before_a_reset_never_pass_for_a_slot(tmp_path: Path) -> None:
    """A block's data may hold what looks like a slot (an image of a cache directory, or a
    hostile one). Under the 8 KiB layout it sits inside slot 3's data; under the 16 KiB one
    it would start slot 2. Even if the old bytes came back after the slab was started afresh
    (a crash), the new slab id refuses it."""
    from imagefs.cache import _PAGE, _SLOT, _SLOT_MAGIC, _data_sum

    a = DiskCache(tmp_path, 1 << 20, block_size=8 * KiB)
    old_id = _slab(a).read_bytes()[16:32]
    kb, forged_data = b"'victim'", b"forged" * 10
    head = bytearray(_PAGE)
    _SLOT.pack_into(head, 0, _SLOT_MAGIC, old_id, 1, len(kb), len(forged_data),
                    _data_sum(kb, forged_data), 0)
    head[_SLOT.size:_SLOT.size + len(kb)] = kb
    struct.pack_into("<I", head, _SLOT.size - 4, zlib.crc32(kb, zlib.crc32(head[:_SLOT.size - 4])))
    for i in range(3):
        a.put(i, bytes(8 * KiB))
    a.put(3, (bytes(head) + forged_data).ljust(8 * KiB, b"\0"))
    assert 4096 + 3 * (4096 + 8 * KiB) + 4096 == 4096 + 2 * SLOT  # slot 3's data = new slot 2
    old = _slab(a).read_bytes()
    DiskCache(tmp_path, 1 << 20, block_size=16 * KiB)  # another layout: started afresh
    with open(tmp_path / "slab", "r+b") as fh:  # ... and the old bytes came back
        fh.seek(4096)
        fh.write(old[4096:])
    c = DiskCache(tmp_path, 1 << 20, block_size=16 * KiB)
    assert not c.contains("victim") and c.get("victim") is None and c.used == 0


def test_unreadable_or_unwritable_disk_cache_is_a_miss_with_one_warning(
        tmp_path: Path, monkeypatch: Any, caplog: Any) -> None:
    d = DiskCache(tmp_path, 1 << 20, block_size=16 * KiB)
    d.put("a", b"a" * 100)
    d.put("b", b"b" * 100)

    def fail(*_: object) -> Any:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "pread", fail)
    monkeypatch.setattr(os, "pwritev", fail)
    with caplog.at_level(logging.WARNING, logger="imagefs.cache"):
        assert d.get("a") is None and d.get("b") is None
        d.put("c", b"c" * 100)
        d.put("d", b"d" * 100)
    assert len([r for r in caplog.records if "cannot read" in r.message]) == 1
    assert len([r for r in caplog.records if "cannot store" in r.message]) == 1
    monkeypatch.undo()
    assert not d.contains("c") and d.used == 0
    d.put("c", b"c" * 100)
    assert d.get("c") == b"c" * 100


def test_concurrent_puts_and_gets_never_return_another_blocks_bytes(tmp_path: Path) -> None:
    """Writers fill a cache of 3 slots from 40 keys while readers read: every hit is the
    key's own bytes."""
    d = DiskCache(tmp_path, 4096 + 3 * SLOT, block_size=16 * KiB)
    value = {k: bytes([k]) * (16 * KiB - k) for k in range(40)}
    wrong: list[int] = []
    hits = [0]
    stop = threading.Event()

    def write(seed: int) -> None:
        rnd = random.Random(seed)
        while not stop.is_set():
            d.put(k := rnd.randrange(40), value[k])

    def read(seed: int) -> None:
        rnd = random.Random(seed)
        while not stop.is_set():
            got = d.get(k := rnd.randrange(40))
            if got is not None:
                hits[0] += 1
                if bytes(got) != value[k]:
                    wrong.append(k)

    threads = [threading.Thread(target=f, args=(i,)) for i, f in enumerate([write] * 2 +
                                                                           [read] * 3)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join()
    assert not wrong and hits[0] > 0
    assert d.used <= 3 * SLOT and _slab(d).stat().st_size <= 4096 + 3 * SLOT


def test_hasher_matches_hashlib() -> None:
    import hashlib

    h = ImageHasher("sha512")
    h.update(b"abc")
    h.update_zeros(3 << 20)
    data = b"abc" + bytes(3 << 20)
    assert h.meta() == {"os_hash_algo": "sha512",
                        "os_hash_value": hashlib.sha512(data).hexdigest(),
                        "checksum": hashlib.md5(data).hexdigest()}


def test_a_run_is_read_in_order_and_each_block_is_checked(tmp_path: Path,
                                                          monkeypatch: Any) -> None:
    """get_run reads its blocks one after the other in the order asked (a sequential reader
    needs the first first), checks every block on its own (a corrupt one in the middle is a
    miss and dropped; its neighbours are served) and answers a key it does not hold with
    None, in its place."""
    d = DiskCache(tmp_path, 4096 + 16 * SLOT, block_size=16 * KiB)
    value = {k: bytes([65 + k]) * (16 * KiB if k != 6 else 100) for k in range(10)}
    for k in range(10):
        d.put(k, value[k])
    with open(_slab(d), "r+b") as fh:  # corrupt block 2's data
        fh.seek(4096 + 2 * SLOT + 4096 + 10)
        fh.write(b"!")
    real_pread = os.pread
    offsets: list[int] = []

    def pread(fd: int, n: int, off: int) -> bytes:
        offsets.append(off)
        return real_pread(fd, n, off)

    monkeypatch.setattr(os, "pread", pread)
    keys = [9, 0, 1, 2, 3, 4, 5, 6, 7, "absent", 8]
    got = list(d.get_run(keys))
    assert [None if g is None else bytes(g) for g in got] == [
        value[9], value[0], value[1], None, value[3], value[4], value[5], value[6], value[7],
        None, value[8]]
    assert offsets == [4096 + k * SLOT for k in (9, 0, 1, 2, 3, 4, 5, 6, 7, 8)]
    assert not d.contains(2) and d.contains(3)


def test_a_run_past_the_end_of_a_truncated_slab_is_a_miss(tmp_path: Path) -> None:
    """The slab lost its tail (a crash, a full disk): the blocks it held are misses, dropped,
    and the ones still whole are served."""
    d = DiskCache(tmp_path, 4096 + 8 * SLOT, block_size=16 * KiB)
    for k in range(4):
        d.put(k, bytes([k]) * (16 * KiB))
    os.truncate(_slab(d), 4096 + 2 * SLOT + 4096 + 100)  # block 2 cut short, 3 gone
    got = list(d.get_run([0, 1, 2, 3]))
    assert [None if g is None else bytes(g) for g in got] == [
        bytes([0]) * (16 * KiB), bytes([1]) * (16 * KiB), None, None]
    assert d.contains(0) and not d.contains(2) and not d.contains(3)
