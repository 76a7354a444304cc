"""Block cache bounds and integrity: corrupt disk blocks are never served."""

from __future__ import annotations

from pathlib import Path

from imagefs.cache import DiskCache, MemoryCache
from imagefs.hashing import ImageHasher


def test_memory_cache_is_bounded() -> None:
    m = MemoryCache(10_000)
    for i in range(50):
        m.put(("k", i), bytes(1000))
    assert m.used <= 10_000
    assert m.get(("k", 49)) is not None and m.get(("k", 0)) is None


def test_disk_cache_bounded_and_survives_restart(tmp_path: Path) -> None:
    d = DiskCache(tmp_path, 50_000)
    for i in range(20):
        d.put(("img", "v1", i), bytes([i]) * 10_000)
    assert d.used <= 50_000
    assert d.get(("img", "v1", 19)) == bytes([19]) * 10_000
    assert d.get(("img", "v1", 0)) is None
    d2 = DiskCache(tmp_path, 50_000)  # a remount finds what is still there
    assert d2.get(("img", "v1", 19)) == bytes([19]) * 10_000
    assert d2.get(("img", "v2", 19)) is None  # another version is another key


def test_disk_cache_detects_corruption(tmp_path: Path) -> None:
    d = DiskCache(tmp_path, 1 << 20)
    key = ("img", "v1", 3)
    d.put(key, b"a" * 4096)
    (f,) = [p for p in tmp_path.rglob("*") if p.is_file()]
    raw = bytearray(f.read_bytes())
    raw[-10] ^= 0xFF
    f.write_bytes(bytes(raw))
    assert d.get(key) is None
    assert not f.exists()
    d.put(key, b"b" * 4096)
    f2 = next(p for p in tmp_path.rglob("*") if p.is_file())
    f2.write_bytes(f2.read_bytes()[:100])  # torn write
    assert d.get(key) is None


def test_hasher_matches_hashlib() -> None:
    import hashlib

    h = ImageHasher("sha512")
    h.update(b"abc")
    h.update_zeros(3 << 20)
    data = b"abc" + bytes(3 << 20)
    assert h.meta() == {"os_hash_algo": "sha512",
                        "os_hash_value": hashlib.sha512(data).hexdigest(),
                        "checksum": hashlib.md5(data).hexdigest()}
