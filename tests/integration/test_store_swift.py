"""The swift store against real OpenStack Swift (tempauth) and Ceph RGW's Swift API.

Two layers: the store API called directly (list/stat/read_range, uploads small and SLO, abort,
rename, delete, metadata, crash leftovers, configuration, a dead proxy), and real mounts driven by
cp, dd, rsync, qemu-img and fio, a multi-GiB SLO, replacement while open and a daemon crash.
After every writing scenario the segment container is checked to hold exactly the segments the
published manifests use, and no pending markers.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from imagefs import config as config_mod
from imagefs.stores import build
from imagefs.stores.base import BackendError, Changed, NotFound, Store, Unsupported
from imagefs.stores.swift import SwiftStore
from imagefs.stores.swift.connection import Connections
from imagefs.stores.swift.journal import PENDING_PREFIX
from tests.backends.fixtures import swift_connection
from tests.integration.test_common import make_file, sh, sha256
from tests.mounting import IMAGEFS, Mount, daemon_pid, kill_daemon_mid_write, tool, unmount

MiB = 1 << 20
KINDS = ["swift", "rgw_swift"]


# ------------------------------------------------------------------------------- helpers
@pytest.fixture(params=KINDS)
def table(request: pytest.FixtureRequest) -> dict[str, Any]:
    """A fresh swift store table, once on OpenStack Swift and once on RGW's Swift API."""
    return request.getfixturevalue(f"{request.param}_store_table")


def key_of(table: dict[str, Any]) -> str:
    return Path(table["key_file"]).read_text().strip()


def raw(table: dict[str, Any]) -> Any:
    """A plain swiftclient connection to the table's account, to look behind the store."""
    return swift_connection(table["auth_url"], table["user"], key_of(table))


def seg_container(table: dict[str, Any]) -> str:
    return table.get("segment_container") or f"{table['container']}_segments"


@pytest.fixture
def open_store(tmp_path: Path) -> Iterator[Callable[..., SwiftStore]]:
    """``open_store(table, **overrides)`` → an opened SwiftStore, closed at teardown."""
    opened: list[Store] = []

    def make(table: dict[str, Any], **overrides: Any) -> SwiftStore:
        cfg = config_mod.parse({"stores": {"s": {**table, **overrides}}}, tmp_path / "c.toml")
        store = build(cfg.stores[0])
        store.open()
        opened.append(store)
        assert isinstance(store, SwiftStore)
        return store

    yield make
    for s in opened:
        s.close()


def upload(store: Store, name: str, data: bytes, meta: dict[str, str] | None = None,
           chunk: int = 4 * MiB) -> Any:
    up = store.upload(name)
    for off in range(0, len(data), chunk):
        up.write(off, data[off:off + chunk])
    return up.commit(meta or {"mtime": "1500000000.25", "mode": "640"})


def pattern(size: int, seed: str) -> bytes:
    return b"".join(hashlib.sha512(f"{seed}{i}".encode()).digest()
                    for i in range(size // 64 + 1))[:size]


def listing(conn: Any, container: str, prefix: str | None = None) -> list[str]:
    _, objs = conn.get_container(container, full_listing=True, prefix=prefix)
    return [o["name"] for o in objs]


def assert_clean(table: dict[str, Any]) -> set[str]:
    """No pending markers, and every segment belongs to a group a published manifest names."""
    conn = raw(table)
    try:
        segs = listing(conn, seg_container(table))
        assert not [s for s in segs if s.startswith(PENDING_PREFIX)], segs
        groups = set()
        for name in listing(conn, table["container"]):
            h = conn.head_object(table["container"], name)
            if h.get("x-static-large-object", "").lower() == "true":
                groups.add(h["x-object-meta-imagefs-segments"])
        orphans = [s for s in segs if s.rsplit("/", 1)[0] not in groups]
        assert orphans == [], f"segments no manifest uses: {orphans[:5]}"
        return groups
    finally:
        conn.close()


# ------------------------------------------------------------------------------- store API
def test_list_stat_read_small_and_slo(table: dict[str, Any],
                                      open_store: Callable[..., SwiftStore]) -> None:
    store = open_store(table)
    small = os.urandom(100_000)
    big = pattern(10 * MiB + 5, "big")  # 4 MiB segments: 3 of them
    hashes = {"os_hash_algo": "sha512", "os_hash_value": hashlib.sha512(big).hexdigest(),
              "checksum": hashlib.md5(big).hexdigest()}
    i_small = upload(store, "small.raw", small)
    i_big = upload(store, "big.raw", big, {"mtime": "1600000000.5", "mode": "600", **hashes})
    assert (i_small.size, i_big.size) == (len(small), len(big))
    assert i_big.mtime == 1600000000.5 and i_big.mode & 0o777 == 0o600
    assert {k: i_big.meta[k] for k in hashes} == hashes

    conn = raw(table)
    c = table["container"]
    conn.put_object(c, ".imagefs-hidden", b"h")
    conn.put_object(c, "dir/obj", b"d")
    conn.put_object(c, "foreign.raw", b"f" * 10)
    h_big = conn.head_object(c, "big.raw")
    h_small = conn.head_object(c, "small.raw")
    assert h_big["x-static-large-object"].lower() == "true"
    assert "x-static-large-object" not in h_small  # small images are plain objects
    assert i_big.version == h_big["etag"].strip('"')  # the SLO ETag, as HEAD gives it
    assert i_small.version == hashlib.md5(small).hexdigest()
    if table["auth_url"].endswith("/auth/v1.0"):  # OpenStack Swift: listing agrees (slo_etag)
        _, objs = conn.get_container(c)
        entry = next(o for o in objs if o["name"] == "big.raw")
        assert entry["slo_etag"].strip('"') == i_big.version

    infos = {i.name: i for i in store.list()}
    assert set(infos) == {"small.raw", "big.raw", "foreign.raw"}
    assert infos["big.raw"] == store.stat("big.raw") == i_big
    assert infos["small.raw"] == i_small
    foreign = infos["foreign.raw"]
    assert foreign.size == 10 and foreign.mode & 0o777 == 0o644 and foreign.mtime > 1e9
    with pytest.raises(NotFound):
        store.stat("missing.raw")

    b = 4 * MiB
    assert store.read_range("big.raw", i_big.version, b - 7, 20) == big[b - 7:b + 13]
    assert store.read_range("big.raw", i_big.version, 0, 9 * MiB) == big[:9 * MiB]
    assert store.read_range("big.raw", i_big.version, len(big) - 3, 100) == big[-3:]
    assert store.read_range("big.raw", i_big.version, len(big), 100) == b""
    assert store.read_range("small.raw", i_small.version, 5, 10) == small[5:15]

    segs = listing(conn, seg_container(table))
    assert len(segs) == 3 and all(s.startswith("big.raw/") for s in segs), segs
    assert h_big["x-object-meta-imagefs-segments"] == segs[0].rsplit("/", 1)[0]
    assert_clean(table)

    # metadata changed by someone else shows in the next listing (its key is last_modified);
    # this POST also wipes the size/ETag/group imagefs keeps in metadata (and on RGW the SLO
    # flag): the store must then fall back to a full HEAD, never report the manifest's size
    conn.post_object(c, "big.raw", headers={"x-object-meta-mode": "604"})
    after = {i.name: i for i in store.list()}["big.raw"]
    assert after.mode & 0o777 == 0o604
    assert (after.size, after.version) == (len(big), i_big.version)
    fresh = open_store(table)
    assert fresh.stat("big.raw").size == len(big)
    assert fresh.read_range("big.raw", i_big.version, b - 7, 20) == big[b - 7:b + 13]
    conn.close()


def test_read_of_a_replaced_image_is_changed(table: dict[str, Any],
                                             open_store: Callable[..., SwiftStore]) -> None:
    store = open_store(table)
    old = upload(store, "img.raw", pattern(9 * MiB, "old"))
    groups_before = assert_clean(table)
    # this store has read the old version (from its segments), a fresh one has not
    assert store.read_range("img.raw", old.version, 0, 10) == pattern(10, "old")
    fresh = open_store(table)
    new = upload(store, "img.raw", pattern(9 * MiB, "new"))
    assert new.version != old.version
    for s in (store, fresh):
        with pytest.raises(Changed):
            s.read_range("img.raw", old.version, 5 * MiB, 4096)
    assert store.read_range("img.raw", new.version, 0, 10) == pattern(10, "new")
    groups_after = assert_clean(table)  # the replaced image's segments are gone
    assert len(groups_after) == 1 and not groups_after & groups_before

    plain = upload(store, "p.raw", b"1" * 1000)
    conn = raw(table)
    conn.put_object(table["container"], "p.raw", b"2" * 1000)  # another client replaces it
    conn.close()
    with pytest.raises(Changed):
        store.read_range("p.raw", plain.version, 0, 10)
    # an SLO replaced by a small plain image: its segments go too
    upload(store, "img.raw", b"tiny")
    assert assert_clean(table) == set()


def test_foreign_slo_reads_through_its_manifest(
        table: dict[str, Any], open_store: Callable[..., SwiftStore]) -> None:
    """An SLO another client made (no segment group of ours) is read with ranged GETs of the
    manifest; one whose segments do not add up to its ETag is not read from segments."""
    conn = raw(table)
    c, segc = table["container"], seg_container(table)
    conn.put_container(c)
    conn.put_container(segc)
    parts = [pattern(3 * MiB, "f0"), pattern(2 * MiB + 7, "f1")]
    manifest = []
    for i, part in enumerate(parts):
        etag = conn.put_object(segc, f"other/{i}", part)
        manifest.append({"path": f"/{segc}/other/{i}", "etag": etag, "size_bytes": len(part)})
    conn.put_object(c, "foreign.raw", json.dumps(manifest).encode(),
                    query_string="multipart-manifest=put",
                    headers={"X-Object-Meta-Imagefs-Segments": "other"})
    conn.put_object(segc, "other/2", b"not part of it")  # the group no longer adds up
    conn.close()
    store = open_store(table)
    info = store.stat("foreign.raw")
    whole = b"".join(parts)
    assert info.size == len(whole)
    assert store.read_range("foreign.raw", info.version, 3 * MiB - 5, 10) == whole[3 * MiB - 5:
                                                                                3 * MiB + 5]
    assert store.read_range("foreign.raw", info.version, 0, len(whole)) == whole
    conn = raw(table)
    conn.delete_object(segc, "other/2")
    conn.put_object(c, "pure.raw", json.dumps(manifest).encode(),  # names no group at all
                    query_string="multipart-manifest=put")
    assert store.read_range("pure.raw", info.version, 5 * MiB, 99) == whole[5 * MiB:]
    store.delete("pure.raw")  # only the server's SLO delete can remove the segments it names
    assert listing(conn, c) == ["foreign.raw"] and listing(conn, segc) == []
    conn.close()


def test_abort_leaves_no_segments(table: dict[str, Any],
                                  open_store: Callable[..., SwiftStore]) -> None:
    store = open_store(table)
    conn = raw(table)
    data = pattern(14 * MiB, "abort")
    up = store.upload("gone.raw")
    for off in range(0, len(data), MiB):
        up.write(off, data[off:off + MiB])
    assert listing(conn, seg_container(table)), "expected segments while uploading"
    up.abort()
    up.abort()  # twice is fine
    assert listing(conn, seg_container(table)) == []
    assert listing(conn, table["container"]) == []
    small = store.upload("small.raw")
    small.write(0, b"x" * 1000)
    small.abort()
    assert listing(conn, table["container"]) == []
    with pytest.raises(BackendError):  # writes must arrive in order
        store.upload("x.raw").write(5, b"x")
    done = store.upload("done.raw")
    done.write(0, data)
    done.commit({})
    done.abort()  # after a commit: nothing happens
    assert store.read_range("done.raw", store.stat("done.raw").version, 0, 8) == data[:8]
    assert_clean(table)
    conn.close()


def test_failed_upload_leaves_no_manifest_and_no_segments(
        table: dict[str, Any], open_store: Callable[..., SwiftStore]) -> None:
    """A segment lost behind the store's back makes the manifest PUT fail (both servers check
    segments): commit raises, nothing appears, and the upload's other segments are removed
    (right after the commit reported, in the background: test_faults.py)."""
    store = open_store(table)
    conn = raw(table)
    data = pattern(13 * MiB, "fail")
    up = store.upload("failed.raw")
    for off in range(0, len(data), 4 * MiB):
        up.write(off, data[off:off + 4 * MiB])
    deadline = time.monotonic() + 60
    while not (first := [s for s in listing(conn, seg_container(table))
                         if s.endswith("/00000000")]):
        assert time.monotonic() < deadline, "segment 0 never arrived"
        time.sleep(0.05)
    conn.delete_object(seg_container(table), first[0])
    with pytest.raises(BackendError):
        up.commit({})
    assert listing(conn, table["container"]) == []
    deadline = time.monotonic() + 60
    while listing(conn, seg_container(table)):
        assert time.monotonic() < deadline, "the failed upload's segments stayed"
        time.sleep(0.1)
    with pytest.raises(NotFound):
        store.stat("failed.raw")
    conn.close()


def test_rename_copies_the_manifest_and_keeps_segments(
        table: dict[str, Any], open_store: Callable[..., SwiftStore]) -> None:
    store = open_store(table)
    odd = "ünï cødé & 'q' 100%20.raw"
    a = pattern(9 * MiB + 1, "a")
    i_a = upload(store, odd, a, {"mtime": "1400000000.0", "mode": "600"})
    upload(store, "b.raw", pattern(6 * MiB, "b"))
    conn = raw(table)
    seg_a = {s for s in listing(conn, seg_container(table)) if not s.startswith("b.raw/")}
    info = store.rename(odd, "b.raw")
    assert info.name == "b.raw" and info.version == i_a.version and info.size == len(a)
    assert info.mtime == 1400000000.0 and info.mode & 0o777 == 0o600
    assert store.read_range("b.raw", info.version, 0, len(a)) == a
    with pytest.raises(NotFound):
        store.stat(odd)
    assert set(listing(conn, seg_container(table))) == seg_a  # b's old segments are gone
    assert [i.name for i in store.list()] == ["b.raw"]
    assert_clean(table)
    upload(store, "p.raw", b"plain")
    store.rename("p.raw", "q.raw")
    assert store.read_range("q.raw", store.stat("q.raw").version, 0, 99) == b"plain"
    assert sorted(i.name for i in store.list()) == ["b.raw", "q.raw"]
    with pytest.raises(NotFound):
        store.rename("p.raw", "r.raw")
    conn.close()


def test_delete_of_an_slo_deletes_its_segments(
        table: dict[str, Any], open_store: Callable[..., SwiftStore]) -> None:
    store = open_store(table)
    upload(store, "big.raw", pattern(13 * MiB, "d"))
    upload(store, "keep.raw", pattern(5 * MiB, "k"))
    upload(store, "small.raw", b"s" * 10)
    store.delete("big.raw")
    store.delete("small.raw")
    conn = raw(table)
    assert listing(conn, table["container"]) == ["keep.raw"]
    assert all(s.startswith("keep.raw/") for s in listing(conn, seg_container(table)))
    with pytest.raises(NotFound):
        store.delete("big.raw")
    assert_clean(table)
    conn.close()


def test_set_meta_merges_and_keeps_the_version(
        table: dict[str, Any], open_store: Callable[..., SwiftStore]) -> None:
    store = open_store(table)
    info = upload(store, "m.raw", pattern(5 * MiB, "m"),
                  {"mtime": "1.5", "mode": "600", "checksum": "abc"})
    after = store.set_meta("m.raw", {"mode": "644"})
    after = store.set_meta("m.raw", {"mtime": "1700000000.0"})
    assert after.version == info.version
    assert (after.mtime, after.mode & 0o777, after.meta["checksum"]) == (1700000000.0, 0o644, "abc")
    assert store.stat("m.raw") == after
    assert {i.name: i for i in store.list()}["m.raw"] == after
    assert store.read_range("m.raw", info.version, 0, 4) == pattern(4, "m")
    assert_clean(table)  # the manifest still names its segments after the POSTs


def put_glance_dlo(table: dict[str, Any], image_id: str, data: bytes, seg: int) -> None:
    """An image as glance_store's Swift driver writes one above its large-object size: a DLO,
    segments ``<id>-00001``... in the same container, a 0-byte manifest naming the prefix."""
    conn = raw(table)
    try:
        for i, off in enumerate(range(0, len(data), seg), start=1):
            conn.put_object(table["container"], f"{image_id}-{i:05d}", data[off:off + seg])
        conn.put_object(table["container"], image_id, b"",
                        headers={"X-Object-Manifest": f"{table['container']}/{image_id}-"})
    finally:
        conn.close()


def test_metadata_changes_keep_a_glance_dlo_whole(table: dict[str, Any],
                                                  mount_factory: Any) -> None:
    """chmod, touch and ``imagefs hash`` POST metadata; Swift drops X-Object-Manifest from a
    POST without it, which turned Glance's DLO images into 0-byte objects."""
    image_id = "6f1a2c3e-0d4b-4b8e-9d2a-1c5e7f9a0b11"
    data = pattern(5 * MiB + 123, "dlo")
    m = mount_factory({"s": table})  # creates the container
    put_glance_dlo(table, image_id, data, 2 * MiB)
    path = m.path("s", image_id)
    assert path.stat().st_size == len(data)
    os.chmod(path, 0o600)
    os.utime(path, (1_600_000_000, 1_600_000_000))
    r = subprocess.run([*IMAGEFS, "hash", str(path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    conn = raw(table)
    try:
        h, body = conn.get_object(table["container"], image_id)
    finally:
        conn.close()
    assert body == data, "the manifest lost its segments"
    assert h["x-object-manifest"] == f"{table['container']}/{image_id}-"
    assert h["x-object-meta-os-hash-value"] == hashlib.sha512(data).hexdigest()
    st = path.stat()
    assert (st.st_mode & 0o777, st.st_mtime, st.st_size) == (0o600, 1_600_000_000, len(data))
    assert path.read_bytes() == data


def objects(table: dict[str, Any]) -> list[str]:
    conn = raw(table)
    try:
        return listing(conn, table["container"])
    finally:
        conn.close()


def test_glance_dlo_reads_lists_renames_and_deletes_as_swift_does(
        table: dict[str, Any], mount_factory: Any,
        open_store: Callable[..., SwiftStore]) -> None:
    """A DLO is the concatenation of the objects under its manifest's prefix: imagefs reads it
    from those segments (pinned to the version a full HEAD gives), lists only the manifest,
    refuses (EBUSY) to delete, rename or write a segment, renames the manifest alone and
    deletes the segments with the image, keeping those another manifest still covers."""
    image_id = "0b9d2f4e-7c1a-4e3b-8f5d-2a6c9e1b7d30"
    data = pattern(5 * MiB + 123, "dlo")
    m = mount_factory({"s": table}, metadata_ttl=0)  # lookups reach the store: no listing cache
    c = table["container"]
    put_glance_dlo(table, image_id, data, 2 * MiB)  # 3 segments, the last one short
    conn = raw(table)
    conn.put_object(c, "other.raw", b"o" * 1000)
    conn.close()
    assert sorted(os.listdir(m.path("s"))) == sorted([image_id, "other.raw"])
    assert m.path("s", image_id).stat().st_size == len(data)
    assert m.path("s", image_id).read_bytes() == data

    store = open_store(table)
    info = store.stat(image_id)
    assert info.size == len(data)
    assert info.version == hashlib.md5("".join(
        hashlib.md5(data[o:o + 2 * MiB]).hexdigest()
        for o in range(0, len(data), 2 * MiB)).encode()).hexdigest()
    assert store.reader.segment_map(image_id, info.version) is not None  # read from the segments
    assert store.read_range(image_id, info.version, 2 * MiB - 5, 4 * MiB) == \
        data[2 * MiB - 5:6 * MiB - 5]
    assert [i.name for i in store.list()] == sorted([image_id, "other.raw"])

    # a segment replaced by another client: the version pinned before fails, never mixes
    new_data = data[:2 * MiB] + pattern(2 * MiB, "swapped") + data[4 * MiB:]
    conn = raw(table)
    conn.put_object(c, f"{image_id}-00002", new_data[2 * MiB:4 * MiB])
    conn.close()
    with pytest.raises(Changed):
        store.read_range(image_id, info.version, 3 * MiB, 100)
    assert m.path("s", image_id).read_bytes() == new_data  # a new open sees the new version
    data = new_data

    seg = m.path("s", f"{image_id}-00001")
    for op in (lambda: os.unlink(seg), lambda: os.rename(seg, m.path("s", "x.raw")),
               lambda: os.rename(m.path("s", "other.raw"), m.path("s", f"{image_id}-00009")),
               lambda: m.path("s", f"{image_id}-00009").write_bytes(b"new segment")):
        with pytest.raises(OSError) as e:
            op()
        assert e.value.errno == errno.EBUSY
    assert "segment of the large object" in m.log_text()
    assert objects(table) == sorted([image_id, "other.raw"] +
                                    [f"{image_id}-{i:05d}" for i in (1, 2, 3)])

    # rename moves the manifest only; the segments stay hidden and read as before
    os.rename(m.path("s", image_id), m.path("s", "renamed.raw"))
    assert sorted(os.listdir(m.path("s"))) == ["other.raw", "renamed.raw"]
    assert m.path("s", "renamed.raw").read_bytes() == data
    conn = raw(table)
    assert conn.head_object(c, "renamed.raw")["x-object-manifest"] == f"{c}/{image_id}-"
    # a second manifest on the same prefix (a copy): deleting one keeps the segments
    conn.put_object(c, "copy.raw", b"", headers={"X-Object-Manifest": f"{c}/{image_id}-"})
    conn.close()
    os.unlink(m.path("s", "renamed.raw"))
    assert m.path("s", "copy.raw").read_bytes() == data
    os.unlink(m.path("s", "copy.raw"))
    assert objects(table) == ["other.raw"]

    # an image written over a DLO takes its place; the segments go
    put_glance_dlo(table, "vm.raw", pattern(3 * MiB, "vm"), MiB)
    m.path("s", "vm.raw").write_bytes(b"plain now")
    assert objects(table) == ["other.raw", "vm.raw"]
    assert m.path("s", "vm.raw").read_bytes() == b"plain now"
    # and one renamed over a DLO too
    put_glance_dlo(table, "vm2.raw", pattern(3 * MiB, "vm2"), MiB)
    os.rename(m.path("s", "vm.raw"), m.path("s", "vm2.raw"))
    assert objects(table) == ["other.raw", "vm2.raw"]
    assert_clean(table)


# ------------------------------------------------------------------------------- review fixes
# Faults are injected by wrapping ``store.client.call`` of a store built from config: the backend
# stays real, only the client's view of one request is changed.
def hook_call(store: SwiftStore, hook: Callable[..., Any]) -> None:
    """``hook(real, what, method, *args, **kwargs)`` replaces ``store.client.call``."""
    real = store.client.call

    def wrapped(what: str, method: str, *a: Any, **k: Any) -> Any:
        return hook(real, what, method, *a, **k)

    store.client.call = wrapped  # type: ignore[method-assign]


def write_all(up: Any, data: bytes, chunk: int = MiB) -> None:
    for off in range(0, len(data), chunk):
        up.write(off, data[off:off + chunk])


def markers(table: dict[str, Any]) -> list[str]:
    conn = raw(table)
    try:
        return [s for s in listing(conn, seg_container(table)) if s.startswith(PENDING_PREFIX)]
    finally:
        conn.close()


def test_manifest_put_error_never_deletes_a_published_manifests_segments(
        table: dict[str, Any], open_store: Callable[..., SwiftStore]) -> None:
    """P1-1: the server stored the manifest but the client saw an error: published, segments
    kept. An error before the server stored it: unknown, segments and marker kept. An abort
    while the manifest PUT is in flight deletes nothing."""
    store = open_store(table, segment_size="1MiB")
    data = pattern(3 * MiB + 7, "m1")

    def lost_answer(real: Any, what: str, method: str, *a: Any, **k: Any) -> Any:
        r = real(what, method, *a, **k)
        if "PUT manifest" in what:
            raise BackendError("PUT manifest: ReadTimeout (simulated)")
        return r

    hook_call(store, lost_answer)
    up = store.upload("img.raw")
    write_all(up, data)
    info = up.commit({"mode": "600"})
    up.abort()  # the writer may abort after a commit it thinks failed: nothing happens
    assert info.size == len(data)
    assert store.read_range("img.raw", info.version, 0, len(data)) == data
    assert_clean(table)

    def refused(real: Any, what: str, method: str, *a: Any, **k: Any) -> Any:
        if "PUT manifest" in what:
            raise BackendError("PUT manifest: connection reset (simulated)")
        return real(what, method, *a, **k)

    hook_call(store, refused)
    up = store.upload("unknown.raw")
    write_all(up, data)
    with pytest.raises(BackendError):
        up.commit({})
    up.abort()
    conn = raw(table)
    assert [s for s in listing(conn, seg_container(table)) if s.startswith(up.group + "/")]
    assert PENDING_PREFIX + up.uid in markers(table)  # cleanup_leftovers decides later
    conn.close()
    store.client.call = Connections.call.__get__(store.client)  # type: ignore[method-assign]
    store.journal.delete_group(up.group)
    store.client.delete_quietly(store.segment_container, PENDING_PREFIX + up.uid)

    in_put, go = threading.Event(), threading.Event()

    def slow(real: Any, what: str, method: str, *a: Any, **k: Any) -> Any:
        if "PUT manifest" in what:
            in_put.set()
            assert go.wait(30)
        return real(what, method, *a, **k)

    hook_call(store, slow)
    up = store.upload("slow.raw")
    write_all(up, data)
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(up.commit({})))
    t.start()
    assert in_put.wait(30)
    up.abort()  # the bridge gave up on commit: abort must not touch its segments
    go.set()
    t.join(60)
    assert result and result[0].size == len(data)
    assert store.read_range("slow.raw", result[0].version, 0, len(data)) == data
    assert_clean(table)


def test_manifest_etag_mismatch_fails_the_commit(
        swift_store_table: dict[str, Any], open_store: Callable[..., SwiftStore]) -> None:
    """P3-7: the manifest PUT's ETag must be the SLO ETag we computed."""
    store = open_store(swift_store_table, segment_size="1MiB")

    def wrong(real: Any, what: str, method: str, *a: Any, **k: Any) -> Any:
        r = real(what, method, *a, **k)
        return "0" * 32 if "PUT manifest" in what else r

    hook_call(store, wrong)
    up = store.upload("e.raw")
    write_all(up, pattern(2 * MiB + 1, "e"))
    with pytest.raises(BackendError, match="ETag"):
        up.commit({})


def test_rename_failures_never_leave_two_manifests_on_one_group(
        table: dict[str, Any], open_store: Callable[..., SwiftStore]) -> None:
    """P1-2: a failed DELETE of the old name rolls the copy back; delete() of a manifest whose
    group another manifest uses deletes the manifest only; a rename cut short by a crash is
    finished at the next mount."""
    store = open_store(table, segment_size="1MiB")
    a, b = pattern(3 * MiB, "ra"), pattern(2 * MiB + 3, "rb")
    ia = upload(store, "a.raw", a)
    upload(store, "b.raw", b)

    def no_delete(real: Any, what: str, method: str, *a: Any, **k: Any) -> Any:
        if what == "a.raw: DELETE":
            raise BackendError("a.raw: DELETE: HTTP 503 (simulated)")
        return real(what, method, *a, **k)

    hook_call(store, no_delete)
    with pytest.raises(BackendError):
        store.rename("a.raw", "b.raw")
    store.client.call = Connections.call.__get__(store.client)  # type: ignore[method-assign]
    with pytest.raises(NotFound):  # the copy was removed, and with it b's old image
        store.stat("b.raw")
    assert store.read_range("a.raw", ia.version, 0, len(a)) == a
    assert_clean(table)

    # two manifests on one group (as a crash between copy and DELETE leaves them)
    conn = raw(table)
    c = table["container"]
    conn.put_object(c, "copy.raw", None, headers={"X-Copy-From": f"/{c}/a.raw"},
                    query_string="multipart-manifest=get")
    store.delete("a.raw")
    assert store.read_range("copy.raw", ia.version, 0, len(a)) == a
    assert_clean(table)
    i2 = upload(store, "copy.raw", b)  # replacing the last user deletes the group
    assert store.read_range("copy.raw", i2.version, 0, len(b)) == b
    assert_clean(table)

    # a crash between copy and DELETE: the next mount finishes the rename
    group = conn.head_object(c, "copy.raw")["x-object-meta-imagefs-segments"]
    conn.put_object(c, "new.raw", None, headers={"X-Copy-From": f"/{c}/copy.raw"},
                    query_string="multipart-manifest=get")
    conn.put_object(seg_container(table), PENDING_PREFIX + "otherhost_1_1_feed",
                    json.dumps({"op": "rename", "image": "new.raw", "source": "copy.raw",
                                "group": group, "groups": []}).encode())
    assert open_store(table, leftover_age=0.0).cleanup_leftovers() == 0
    assert listing(conn, c) == ["new.raw"]
    assert store.read_range("new.raw", i2.version, 0, len(b)) == b
    assert_clean(table)
    conn.close()


def test_set_meta_racing_a_replace_keeps_the_new_images_own_metadata(
        table: dict[str, Any], open_store: Callable[..., SwiftStore]) -> None:
    """P1-3: a replace between set_meta's HEAD and its POST: the new image keeps its own size,
    ETag and segment group, and stays readable."""
    store = open_store(table, segment_size="1MiB")
    other = open_store(table, segment_size="1MiB")
    old, new = pattern(3 * MiB, "so"), pattern(5 * MiB + 1, "sn")
    upload(store, "img.raw", old)
    real = store.listing.head_headers

    def then_replace(name: str, newest: bool = False) -> Any:
        r = real(name, newest)
        upload(other, "img.raw", new)
        return r

    store.listing.head_headers = then_replace  # type: ignore[method-assign]
    store.set_meta("img.raw", {"mtime": "12345"})
    store.listing.head_headers = real  # type: ignore[method-assign]
    fresh = open_store(table)
    info = fresh.stat("img.raw")
    assert info.size == len(new)
    assert fresh.read_range("img.raw", info.version, 0, len(new)) == new
    assert_clean(table)


def test_abort_racing_an_abandoned_write_leaks_nothing(
        swift_store_table: dict[str, Any], open_store: Callable[..., SwiftStore]) -> None:
    """P2-4: abort while a write the bridge gave up on still runs (here: stuck in the marker
    PUT that starts streaming)."""
    table = swift_store_table
    store = open_store(table, segment_size="1MiB", timeout=5.0)
    real = store.journal.put_marker

    def slow_marker(uid: str, record: Any) -> None:
        time.sleep(1.0)
        real(uid, record)

    store.journal.put_marker = slow_marker  # type: ignore[method-assign]
    up = store.upload("img.raw")
    up.write(0, pattern(MiB, "w"))  # buffered
    t = threading.Thread(target=lambda: pytest.raises(BackendError, up.write, MiB,
                                                      pattern(3 * MiB, "x")))
    t.start()
    time.sleep(0.2)
    up.abort()
    t.join(30)
    assert not t.is_alive()
    time.sleep(0.5)
    conn = raw(table)
    assert listing(conn, seg_container(table)) == []
    conn.close()


def test_failed_segment_deletes_keep_the_marker(
        swift_store_table: dict[str, Any], open_store: Callable[..., SwiftStore]) -> None:
    """P2-5: an abort whose segment DELETE fails keeps the marker (the next mount retries)."""
    table = swift_store_table
    store = open_store(table, segment_size="1MiB")
    up = store.upload("img.raw")
    write_all(up, pattern(3 * MiB, "f"))
    conn = raw(table)
    deadline = time.monotonic() + 30
    while f"{up.group}/00000001" not in listing(conn, seg_container(table), prefix=up.group):
        assert time.monotonic() < deadline, "segment 1 never arrived"
        time.sleep(0.05)

    def flaky(real: Any, what: str, method: str, *a: Any, **k: Any) -> Any:
        if method == "delete_object" and "00000001" in what:
            raise BackendError("HTTP 503 (simulated)")
        return real(what, method, *a, **k)

    hook_call(store, flaky)
    up.abort()
    assert markers(table) == [PENDING_PREFIX + up.uid]
    assert listing(conn, seg_container(table), prefix=up.group) == [f"{up.group}/00000001"]
    conn.close()
    store.client.call = Connections.call.__get__(store.client)  # type: ignore[method-assign]
    assert store.journal.delete_group(up.group) == (1, True)
    store.client.delete_quietly(store.segment_container, PENDING_PREFIX + up.uid)
    assert_clean(table)


def test_read_of_an_image_deleted_while_open_is_changed(
        table: dict[str, Any], open_store: Callable[..., SwiftStore]) -> None:
    """P3-6: EIO (Changed), not ENOENT, for plain objects and SLOs alike."""
    store = open_store(table, segment_size="1MiB")
    small = upload(store, "small.raw", b"s" * 1000)
    big = upload(store, "big.raw", pattern(2 * MiB + 5, "d"))
    conn = raw(table)
    conn.delete_object(table["container"], "small.raw")
    conn.delete_object(table["container"], "big.raw")  # the segments stay (orphans)
    conn.close()
    with pytest.raises(Changed):
        store.read_range("small.raw", small.version, 0, 10)
    fresh = open_store(table)  # no segment map cached
    with pytest.raises(Changed):
        fresh.read_range("big.raw", big.version, 0, 10)


def test_segment_maps_of_different_images_do_not_wait_for_each_other(
        swift_store_table: dict[str, Any], open_store: Callable[..., SwiftStore]) -> None:
    """P3-8: one lock per (name, version); a listing that merely lagged is not cached."""
    table = swift_store_table
    store = open_store(table, segment_size="1MiB", timeout=4.0)
    ia = upload(store, "a.raw", pattern(2 * MiB + 1, "a"))
    ib = upload(store, "b.raw", pattern(2 * MiB + 2, "b"))
    real = store.reader.build_segment_map
    inside, go = threading.Event(), threading.Event()
    calls: list[str] = []

    def build(name: str, *a: Any, **k: Any) -> Any:
        calls.append(name)
        if name == "a.raw":
            inside.set()
            assert go.wait(30)
            return None  # as if the segment listing lagged behind
        return real(name, *a, **k)

    store.reader.build_segment_map = build  # type: ignore[method-assign]
    t = threading.Thread(target=store.read_range, args=("a.raw", ia.version, 0, 10))
    t.start()
    assert inside.wait(30)
    assert store.read_range("b.raw", ib.version, 0, 10) == pattern(10, "b")
    go.set()
    t.join(30)
    store.reader.MAP_RETRY = 0.0  # type: ignore[misc]
    store.reader.build_segment_map = real  # type: ignore[method-assign]
    assert store.read_range("a.raw", ia.version, 0, 10) == pattern(10, "a")
    assert store.reader.segment_maps[("a.raw", ia.version)][0] is not None
    assert calls == ["a.raw", "b.raw"]


def test_tls_options_and_close_of_every_connection(
        swift_store_table: dict[str, Any], open_store: Callable[..., SwiftStore],
        tmp_path: Path) -> None:
    """P3-9 and P3-10: ``cacert``/``insecure`` reach both request paths; close() closes the
    Connection of every thread."""
    import ssl

    table = swift_store_table
    store = open_store(table, insecure=True, segment_size="1MiB")
    assert store.client.ssl is not None and store.client.ssl.verify_mode == ssl.CERT_NONE
    for i in range(3):
        upload(store, f"i{i}.raw", pattern(2 * MiB, str(i)))
    assert len(list(store.list())) == 3
    conns = list(store.client.conns)
    assert len(conns) >= 2 and all(c.insecure for c in conns)
    store.close()
    assert store.client.conns == [] and all(c.http_conn is None for c in conns)
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(BackendError, match="cacert"):
        open_store(table, cacert=str(bad))


CRASHER = r"""
import json, os, signal, sys
from pathlib import Path
from imagefs import config
from imagefs.stores import build
table = json.loads(sys.argv[1])
cfg = config.parse({"stores": {"s": table}}, Path("/nonexistent.toml"))
store = build(cfg.stores[0]); store.open()
data = os.urandom(10 << 20)
if sys.argv[2] == "publish":
    up = store.upload("kept.raw")
    up.write(0, data)
    up.commit({})
    sys.exit(0)
up = store.upload("crashed.raw")
for off in range(0, len(data), 1 << 20):
    up.write(off, data[off:off + (1 << 20)])
up._finish_segments()  # all segments stored, the manifest never written
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_leftovers_of_a_killed_uploader_are_removed(
        table: dict[str, Any], open_store: Callable[..., SwiftStore]) -> None:
    conn = raw(table)
    for mode in ("publish", "crash"):
        r = subprocess.run([sys.executable, "-c", CRASHER, json.dumps(table), mode],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == (0 if mode == "publish" else -signal.SIGKILL), r.stderr
    segs = listing(conn, seg_container(table))
    assert [s for s in segs if s.startswith(PENDING_PREFIX)], "expected the crash's marker"
    assert [s for s in segs if s.startswith("crashed.raw/")], "expected the crash's segments"
    store = open_store(table)
    assert store.cleanup_leftovers() == 1
    assert store.cleanup_leftovers() == 0
    # the published image of the (also gone) first process keeps its segments
    assert len(assert_clean(table)) == 1
    assert store.stat("kept.raw").size == 10 * MiB
    assert not [s for s in listing(conn, seg_container(table)) if s.startswith("crashed.raw/")]
    conn.close()


def test_leftovers_of_other_hosts_wait_for_leftover_age(
        swift_store_table: dict[str, Any], open_store: Callable[..., SwiftStore]) -> None:
    table = swift_store_table
    store = open_store(table)
    pub = upload(store, "pub.raw", pattern(5 * MiB, "p"))
    conn = raw(table)
    segc = seg_container(table)
    pub_group = conn.head_object(table["container"], "pub.raw")["x-object-meta-imagefs-segments"]
    orphan_group = "x.raw/otherhost_123_456_abcd"
    conn.put_object(segc, f"{orphan_group}/00000000", b"o" * 100)
    for uid, record in (("otherhost_123_456_abcd", {"image": "x.raw", "groups": [orphan_group]}),
                        # a crash right after publishing: the image uses the group
                        ("otherhost_9_9_feed", {"image": "pub.raw", "groups": [pub_group]})):
        conn.put_object(segc, PENDING_PREFIX + uid, json.dumps(record).encode())
    assert store.cleanup_leftovers() == 0  # another host, and younger than a day
    assert len([s for s in listing(conn, segc) if s.startswith(PENDING_PREFIX)]) == 2
    eager = open_store(table, leftover_age=0.0)
    assert eager.cleanup_leftovers() == 1
    assert_clean(table)
    assert eager.read_range("pub.raw", pub.version, 0, 5 * MiB) == pattern(5 * MiB, "p")
    conn.close()


def test_configuration_errors_name_the_key(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("ST_AUTH", "ST_USER", "ST_KEY", "ST_AUTH_VERSION", "OS_AUTH_URL", "OS_USERNAME",
                "OS_PASSWORD", "OS_PROJECT_NAME", "OS_TENANT_NAME", "OS_USER_DOMAIN_NAME",
                "OS_PROJECT_DOMAIN_NAME", "OS_AUTH_VERSION", "OS_IDENTITY_API_VERSION"):
        monkeypatch.delenv(var, raising=False)
    key = tmp_path / "k"
    key.write_text("secret")
    key.chmod(0o600)
    good = {"type": "swift", "auth_url": "http://127.0.0.1:1/auth/v1.0", "user": "a:b",
            "key_file": str(key), "container": "c"}

    def error(**changes: Any) -> str:
        t = {k: v for k, v in {**good, **changes}.items() if v is not None}
        with pytest.raises(config_mod.ConfigError) as e:
            config_mod.parse({"stores": {"s": t}}, tmp_path / "f.toml")
        return str(e.value)

    config_mod.parse({"stores": {"s": good}}, tmp_path / "f.toml")
    assert "stores.s.segment_container" in error(segment_container="c")
    assert "stores.s.segment_size" in error(segment_size="512KiB")
    assert "stores.s.project_name" in error(auth_version="3")
    assert "stores.s.user_domain_name" in error(auth_version="3", project_name="p")
    assert "stores.s.key_file" in error(key_file=None)
    assert "stores.s.auth_url" in error(auth_url=None)
    assert "stores.s.auth_url" in error(auth_url="http://u:p@host/auth")
    assert "stores.s.container" in error(container=None)
    assert "stores.s.auth_version" in error(auth_version="2")
    assert "stores.s.upload_concurrency" in error(upload_concurrency=0)
    # the environment as the swift CLI reads it fills what the table leaves out
    monkeypatch.setenv("ST_AUTH", "http://127.0.0.1:1/auth/v1.0")
    monkeypatch.setenv("ST_USER", "a:b")
    monkeypatch.setenv("ST_KEY", "secret")
    config_mod.parse({"stores": {"s": {"type": "swift", "container": "c"}}}, tmp_path / "f.toml")
    monkeypatch.setenv("OS_AUTH_URL", "http://127.0.0.1:1/v3")
    monkeypatch.setenv("OS_PROJECT_NAME", "p")
    monkeypatch.setenv("OS_USER_DOMAIN_NAME", "Default")
    monkeypatch.setenv("OS_PROJECT_DOMAIN_NAME", "Default")
    config_mod.parse({"stores": {"s": {"type": "swift", "container": "c", "auth_version": "3"}}},
                     tmp_path / "f.toml")


class Forwarder:
    """A TCP relay to a real proxy that can play dead: when frozen it accepts and reads, but
    never answers and relays nothing (a blackholed proxy, the case that must not hang)."""

    def __init__(self, port: int) -> None:
        self.target = ("127.0.0.1", port)
        self.frozen = threading.Event()
        self.closed = False
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            if self.frozen.is_set():
                continue  # accepted, never answered
            try:
                up = socket.create_connection(self.target)
            except OSError:
                c.close()
                continue
            self.conns.append(up)
            for a, b in ((c, up), (up, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                while self.frozen.is_set() and not self.closed:
                    time.sleep(0.05)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.closed = True
        self.frozen.clear()
        self.sock.close()
        for c in self.conns:
            c.close()


def bounded(fn: Callable[[], Any], limit: float = 180) -> BaseException | None:
    """Run ``fn`` in a thread; return what it raised. A hang fails the test (not a timing
    threshold: the deadline is far beyond every timeout involved)."""
    out: list[BaseException | None] = [None]

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out[0] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(limit)
    assert not t.is_alive(), "the store call hung"
    return out[0]


def test_dead_proxy_ends_in_errors_not_hangs(
        swift: Any, swift_store_table: dict[str, Any], open_store: Callable[..., SwiftStore],
        mount_factory: Any) -> None:
    port = int(swift.auth_url.split(":")[2].split("/")[0])
    fwd = Forwarder(port)
    try:
        table = {**swift_store_table, "auth_url": f"http://127.0.0.1:{fwd.port}/auth/v1.0",
                 "timeout": 2.0, "retries": 1}
        store = open_store(table)
        assert f":{fwd.port}/" in store.properties()["storage_url"]  # tempauth echoes the host
        info = upload(store, "img.raw", pattern(6 * MiB, "dead"))
        m = mount_factory({"s": {**table, "timeout": 3.0}}, metadata_ttl=0)
        assert m.path("s", "img.raw").stat().st_size == 6 * MiB
        fwd.frozen.set()
        for call in (lambda: store.read_range("img.raw", info.version, 0, 4096),
                     lambda: store.stat("img.raw"),
                     lambda: list(store.list()),
                     lambda: upload(store, "new.raw", pattern(9 * MiB, "n"))):
            assert isinstance(bounded(call), BackendError)
        r = subprocess.run(["dd", f"if={m.path('s', 'img.raw')}", "of=/dev/null", "bs=1M",
                            "status=none"], capture_output=True, text=True, timeout=180)
        assert r.returncode != 0 and "Input/output error" in r.stderr, r.stderr
        # a proxy that never answers the first request: open() fails too
        dead = {**table, "container": table["container"] + "-x"}
        cfg = config_mod.parse({"stores": {"s": dead}}, Path("/nonexistent.toml"))
        assert isinstance(bounded(build(cfg.stores[0]).open), BackendError)
    finally:
        fwd.frozen.clear()
        time.sleep(0.1)
        fwd.close()


def test_secrets_stay_out_of_logs_properties_and_locations(
        table: dict[str, Any], mount_factory: Any,
        open_store: Callable[..., SwiftStore]) -> None:
    swift_store_table = table
    key = key_of(swift_store_table)
    m = mount_factory({"s": swift_store_table})
    p = m.path("s", "h.raw")
    p.write_bytes(os.urandom(6 * MiB))
    loc = os.getxattr(p, "user.imagefs.location").decode()
    store = open_store(swift_store_table)
    assert loc == store.location("h.raw")
    storage = store.properties()["storage_url"]
    assert loc == "swift+http://" + storage.split("://", 1)[1] + \
        f"/{swift_store_table['container']}/h.raw"
    ref = open_store(swift_store_table, glance_reference="ref1")
    # verbatim: glance_store does not percent-decode the object name (a%20b would be another)
    container = swift_store_table["container"]
    assert ref.location("a b.raw") == f"swift+config://ref1/{container}/a b.raw"
    with pytest.raises(Unsupported):  # no Glance form: urlparse would end the name at '?'
        ref.location("a?b.raw")
    r = subprocess.run([*IMAGEFS, "stores", str(m.config), "--json"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)["stores"][0]["properties"]
    assert row["container"] == swift_store_table["container"] and row["images"] == 1
    token = store.client.token  # the mount's own token is another one: no secret may show
    assert token
    for text in (loc, r.stdout, json.dumps(store.properties()), m.log_text()):
        assert key not in text and token not in text
        assert "AUTH_tk" not in text and "AUTH_rgwtk" not in text


# ------------------------------------------------------------------------------- mounts
def test_tools_through_a_mount(table: dict[str, Any], mount_factory: Any,
                               local_store_table: dict[str, Any], tmp_path: Path) -> None:
    m: Mount = mount_factory({"s": table, "local": local_store_table})
    src = tmp_path / "src.raw"
    digest = make_file(src, 30 * MiB + 4321, "cp")
    sh("cp", src, m.path("s", "cp.raw"))
    sh("cmp", src, m.path("s", "cp.raw"))
    sh("cp", m.path("s", "cp.raw"), tmp_path / "back.raw")
    assert sha256(tmp_path / "back.raw") == digest

    sh("dd", f"if={src}", f"of={m.path('s', 'dd.raw')}", "bs=1M", "conv=fsync", "status=none")
    sh("dd", f"if={m.path('s', 'dd.raw')}", f"of={tmp_path / 'part'}", "bs=1M", "skip=7",
       "count=9", "status=none")
    with open(src, "rb") as f:
        f.seek(7 * MiB)
        assert (tmp_path / "part").read_bytes() == f.read(9 * MiB)

    tool("rsync")
    tree = tmp_path / "tree"
    tree.mkdir()
    make_file(tree / "a.raw", 9 * MiB + 3, "a")  # an SLO, written under a temp name, renamed
    make_file(tree / "b.raw", MiB, "b")
    os.chmod(tree / "b.raw", 0o600)
    dest = str(m.path("s")) + "/"
    sh("rsync", "-a", f"{tree}/", dest)
    second = sh("rsync", "-a", "--itemize-changes", f"{tree}/", dest)
    assert second.stdout.strip() == "", second.stdout
    for name in ("a.raw", "b.raw"):
        sh("cmp", tree / name, m.path("s", name))
        assert int(os.stat(m.path("s", name)).st_mtime) == int(os.stat(tree / name).st_mtime)

    tool("qemu-img")
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(48 * MiB)
        for off in (0, 7 * MiB + 11, 30 * MiB, 48 * MiB - 4096):
            f.seek(off)
            f.write(hashlib.sha512(str(off).encode()).digest() * 64)
    q = m.path("s", "disk.qcow2")
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", disk, q)  # writes out of order
    sh("qemu-img", "compare", "-f", "raw", "-F", "qcow2", disk, q)
    sh("qemu-img", "convert", "-O", "raw", q, m.path("s", "disk.raw"))
    sh("qemu-img", "compare", "-f", "raw", "-F", "raw", disk, m.path("s", "disk.raw"))

    if shutil.which("fio"):
        for args in (("--rw=randwrite", "--do_verify=1"),
                     ("--rw=randread", "--verify_only", "--randrepeat=1")):
            r = sh("fio", "--name=v", f"--filename={m.path('s', 'fio.img')}", "--size=24M",
                   "--bs=64k", "--ioengine=psync", "--verify=crc32c", "--verify_fatal=1",
                   "--verify_state_save=0", *args, check=False)
            assert r.returncode == 0, r.stdout + r.stderr
    names = set(os.listdir(m.path("s")))
    assert {"cp.raw", "dd.raw", "a.raw", "b.raw", "disk.qcow2", "disk.raw"} <= names
    assert not [n for n in names if n.startswith(".")]
    groups = assert_clean(table)  # spool fall-backs and rsync's renames left nothing behind
    assert len(groups) >= 4


def test_replaced_while_open_never_mixes(table: dict[str, Any], mount_factory: Any,
                                         open_store: Callable[..., SwiftStore]) -> None:
    m = mount_factory({"s": table}, metadata_ttl=0)
    old, new = pattern(12 * MiB, "old"), pattern(12 * MiB, "new")
    m.path("s", "img.raw").write_bytes(old)
    other = open_store(table)  # another writer, outside this mount
    with open(m.path("s", "img.raw"), "rb", buffering=0) as f:
        assert f.read(65536) == old[:65536]
        upload(other, "img.raw", new)
        try:
            f.seek(9 * MiB)
            rest = f.read(MiB)
        except OSError as e:
            assert e.errno == errno.EIO
        else:
            assert rest == old[9 * MiB:10 * MiB], "bytes of the replacement mixed into a reader"
    assert m.path("s", "img.raw").read_bytes() == new
    assert_clean(table)


def test_multi_gib_image_is_an_slo(swift_store_table: dict[str, Any], mount_factory: Any,
                                   tmp_path: Path) -> None:
    """2 GiB in 64 MiB segments through a mount, with the daemon's memory bounded throughout:
    its peak RSS must not grow with the image (segments stream; nothing holds the whole image).
    Swift's storage here is RAM, so the image is deleted at the end."""
    table = {**swift_store_table, "segment_size": "64MiB"}
    m = mount_factory({"s": table})
    size, block = 2048 * MiB, MiB
    n = size // block

    def blk(i: int) -> bytes:
        return hashlib.sha512(str(i).encode()).digest() * (block // 64)

    p = m.path("s", "huge.raw")
    with open(p, "wb") as f:
        for i in range(n):
            f.write(blk(i))
    assert os.stat(p).st_size == size
    conn = raw(table)
    segs = listing(conn, seg_container(table))
    assert len(segs) == size // (64 * MiB) and all(s.startswith("huge.raw/") for s in segs)
    h = conn.head_object(table["container"], "huge.raw")
    assert h["x-static-large-object"].lower() == "true" and int(h["content-length"]) == size
    with open(p, "rb", buffering=0) as f:
        f.seek(size - 3 * MiB - 5)
        tail = f.read(2 * MiB)
        assert tail == (blk(n - 4) + blk(n - 3) + blk(n - 2))[MiB - 5:3 * MiB - 5]
        f.seek(0)
        for i in range(n):
            assert f.read(block) == blk(i), f"block {i}"
    peak = _peak_rss(daemon_pid(m))
    print(f"daemon peak RSS {peak / MiB:.0f} MiB")
    assert peak < MEMORY_BOUND, f"daemon peak RSS {peak / MiB:.0f} MiB for a 2 GiB image"
    p.unlink()
    assert listing(conn, seg_container(table)) == []
    conn.close()


#: Daemon peak RSS allowed while moving a 2 GiB image: interpreter + 64 MiB block cache +
#: per-upload buffers (16 MiB small-image buffer, 2 segments x 4 queued 4 MiB chunks) + reads.
MEMORY_BOUND = 400 * MiB


def _peak_rss(pid: int) -> int:
    """VmHWM of a process, in bytes: the most RAM it ever held."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_daemon_crash_mid_upload_is_cleaned_at_remount(
        swift_store_table: dict[str, Any], mount_factory: Any) -> None:
    table = swift_store_table
    m = mount_factory({"s": table})
    m.path("s", "kept.raw").write_bytes(pattern(9 * MiB, "kept"))
    conn = raw(table)

    def segments_reached_the_store() -> None:
        deadline = time.monotonic() + 60
        while not [s for s in listing(conn, seg_container(table), prefix="crash.raw/")]:
            assert time.monotonic() < deadline, "the upload never reached the store"
            time.sleep(0.1)

    kill_daemon_mid_write(m, m.path("s", "crash.raw"), hold=60, nbytes=13 << 20,
                          before=segments_reached_the_store)
    assert [s for s in listing(conn, seg_container(table)) if s.startswith(PENDING_PREFIX)]
    r = subprocess.run([*IMAGEFS, "mount", str(m.config), str(m.root), "-o", f"log={m.log}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "removed 1 upload(s) left by a crash" in m.log_text()
    assert sorted(os.listdir(m.path("s"))) == ["kept.raw"]
    assert m.path("s", "kept.raw").read_bytes() == pattern(9 * MiB, "kept")
    assert len(assert_clean(table)) == 1
    conn.close()
    unmount(m)


def test_uploads_share_the_stores_memory(table: dict[str, Any],
                                         open_store: Callable[..., SwiftStore]) -> None:
    """Eight uploads at once into a store with ``upload_memory = 8MiB``: small images held to
    their close take only what is free of their half (the others stream as SLOs), queued
    chunks wait for room, neither half is ever exceeded, nothing starves, every image arrives
    intact, and an abort gives its memory back."""
    store = open_store(table, segment_size="2MiB", upload_memory="8MiB")
    sizes = [MiB + MiB // 2] * 4 + [7 * MiB + 5] * 4  # small (< 2 MiB) and SLO
    datas = {f"i{n}.raw": pattern(size, f"mem{n}") for n, size in enumerate(sizes)}
    ready = threading.Barrier(len(datas) + 1)
    infos: dict[str, Any] = {}
    errors: list[BaseException] = []

    def one(name: str, data: bytes) -> None:
        try:
            up = store.upload(name)
            half = len(data) // 2
            write_all(up, data[:half])
            ready.wait(60)  # every writer holds what it buffered now
            for off in range(half, len(data), MiB):
                up.write(off, data[off:min(off + MiB, len(data))])
            infos[name] = up.commit({})
        except BaseException as e:
            errors.append(e)
            ready.abort()

    threads = [threading.Thread(target=one, args=kv) for kv in datas.items()]
    for t in threads:
        t.start()
    ready.wait(60)
    for t in threads:
        t.join(300)
    assert not errors, errors
    small, chunks = store.small_memory, store.memory
    assert small.peak <= small.limit and chunks.peak <= chunks.limit
    assert small.limit + chunks.limit == 8 * MiB
    assert small.refused > 0, "no small image was refused: the test proves nothing"
    assert small.used == 0 and chunks.used == 0
    for name, data in datas.items():
        assert infos[name].size == len(data)
        assert store.read_range(name, infos[name].version, 0, len(data)) == data, name
    up = store.upload("gone.raw")
    write_all(up, pattern(5 * MiB, "gone"))
    up.abort()
    assert small.used == 0 and chunks.used == 0
    assert_clean(table)
    print(f"8 uploads: small images peak {small.peak / MiB:.1f} of {small.limit / MiB:.0f} MiB "
          f"({small.refused} refused), queued chunks peak {chunks.peak / MiB:.1f} of "
          f"{chunks.limit / MiB:.0f} MiB")


def test_listing_pages_past_1000_objects(table: dict[str, Any], mount_factory: Any) -> None:
    """Container listings answer 1,000 names a page: markers follow every page through the
    mount; the segment container and markers never show."""
    from concurrent.futures import ThreadPoolExecutor

    names = [f"img-{i:05d}.raw" for i in range(1234)]
    local = threading.local()

    def put(name: str) -> None:
        if not hasattr(local, "conn"):
            local.conn = raw(table)
        local.conn.put_object(table["container"], name, name.encode())

    conn = raw(table)
    conn.put_container(table["container"])
    conn.close()
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(put, names))
    m = mount_factory({"s": table})
    assert sorted(os.listdir(m.path("s"))) == names
    assert m.path("s", names[-1]).read_bytes() == names[-1].encode()
