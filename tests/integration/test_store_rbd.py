"""The rbd store against the harness's two real Ceph clusters.

cp/rsync/dd/qemu-img/fio through a mount already run on kind "rbd" in test_common.py; this file
covers what is RBD's own: two clusters (and two pools of one cluster) in one mount, interchange
with the ``rbd`` CLI both ways, the Glance layout (protected ``snap``, location, EBUSY with
clones), sparseness as RBD counts it (``rbd du``), replacement under an open reader, crash
leftovers and an unreachable cluster. Everything is checked from outside imagefs with the
``rbd``/``ceph`` CLIs or librbd.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imagefs import config as config_mod
from imagefs.stores import build
from imagefs.stores.base import BackendError, Changed, Store
from tests.backends.fixtures import rados_connection, unique_name
from tests.integration.test_common import make_file, sh, sha256
from tests.kinds.rbd import rbd_table
from tests.mounting import IMAGEFS, kill_daemon_mid_write, tool

MiB = 1 << 20


# ------------------------------------------------------------------------------- helpers
def rbd(table: dict[str, Any], *args: str | Path, check: bool = True
        ) -> subprocess.CompletedProcess[str]:
    """The real ``rbd`` CLI on the table's cluster and pool (``-p`` before the subcommand)."""
    tool("rbd")
    return sh("rbd", "-c", table["conf"], "--keyring", table["keyring"], "--id", table["user"],
              "-p", table["pool"], *args, check=check)


def rbd_json(table: dict[str, Any], *args: str) -> Any:
    out = rbd(table, *args, "--format", "json").stdout
    return json.loads(out) if out.strip() else {}  # `image-meta list` prints nothing if empty


def listed(table: dict[str, Any]) -> list[str]:
    """Every image in the pool, hidden ones included (imagefs hides them, rbd does not)."""
    return rbd_json(table, "ls")


def used_bytes(table: dict[str, Any], name: str) -> int:
    (img,) = [i for i in rbd_json(table, "du", name)["images"] if i["name"] == name]
    return int(img["used_size"])


def open_store(table: dict[str, Any], tmp_path: Path, sid: str = "r") -> Store:
    """The store itself, built from the same table a mount would use, connected."""
    cfg = config_mod.parse({"stores": {sid: table}}, tmp_path / "direct.toml")
    store = build(cfg.stores[0])
    store.open()
    return store


@pytest.fixture
def extra_pool(ceph: Any) -> Iterator[str]:
    """A second pool on ``ceph`` (the first comes from ``rbd_pool``), removed afterwards."""
    import rbd as librbd

    pool = unique_name()
    with rados_connection(ceph) as cluster:
        cluster.create_pool(pool)
        with cluster.open_ioctx(pool) as ioctx:
            librbd.RBD().pool_init(ioctx, True)
    yield pool
    with rados_connection(ceph) as cluster:
        if cluster.pool_exists(pool):
            cluster.delete_pool(pool)


# ------------------------------------------------------------------------------- clusters
def test_two_clusters_and_two_pools_in_one_mount(
        mount_factory: Any, ceph: Any, ceph2: Any, rbd_store_table: dict[str, Any],
        rbd2_store_table: dict[str, Any], extra_pool: str, tmp_path: Path) -> None:
    assert ceph.fsid != ceph2.fsid
    other_pool = rbd_table(ceph, extra_pool, stat_ttl=0)
    one = {**rbd_store_table, "stat_ttl": 0}
    m = mount_factory({"one": one, "two": {**rbd2_store_table, "glance_layout": True},
                       "pool2": other_pool})
    src = tmp_path / "src.raw"
    digest = make_file(src, 13 * MiB + 777, "clusters")
    sh("cp", src, m.path("one", "img.raw"))
    sh("cp", m.path("one", "img.raw"), m.path("two", "img.raw"))  # cluster → other cluster
    sh("cp", m.path("two", "img.raw"), m.path("pool2", "img.raw"))  # and back, other pool
    for sid in ("one", "two", "pool2"):
        assert sha256(m.path(sid, "img.raw")) == digest
    # seen from each cluster itself: the image is really there, with the right bytes
    for table in (rbd_store_table, rbd2_store_table, other_pool):
        out = tmp_path / f"export-{table['pool']}.raw"
        rbd(table, "export", "img.raw", out)
        assert sha256(out) == digest
        out.unlink()
    # Glance's rbd:// form names the snapshot it reads: none without one (no glance_layout)
    for sid in ("one", "pool2"):
        assert "user.imagefs.location" not in os.listxattr(m.path(sid, "img.raw"))
    for table in (rbd_store_table, other_pool):  # as Glance leaves its images
        rbd(table, "snap", "create", "img.raw@snap")
    locations = {sid: os.getxattr(m.path(sid, "img.raw"), "user.imagefs.location").decode()
                 for sid in ("one", "two", "pool2")}
    assert locations == {
        "one": f"rbd://{ceph.fsid}/{rbd_store_table['pool']}/img.raw/snap",
        "two": f"rbd://{ceph2.fsid}/{rbd2_store_table['pool']}/img.raw/snap",
        "pool2": f"rbd://{ceph.fsid}/{extra_pool}/img.raw/snap",
    }


def test_namespace_is_a_separate_store(mount_factory: Any, ceph: Any,
                                       rbd_store_table: dict[str, Any], tmp_path: Path) -> None:
    import rbd as librbd

    with rados_connection(ceph) as cluster, \
            cluster.open_ioctx(rbd_store_table["pool"]) as ioctx:
        librbd.RBD().namespace_create(ioctx, "tenant")
    ns_table = {**rbd_store_table, "namespace": "tenant"}
    m = mount_factory({"plain": rbd_store_table, "ns": ns_table})
    m.path("ns", "a.raw").write_bytes(b"in the namespace")
    m.path("plain", "b.raw").write_bytes(b"in the pool")
    assert os.listdir(m.path("ns")) == ["a.raw"] and os.listdir(m.path("plain")) == ["b.raw"]
    assert listed(rbd_store_table) == ["b.raw"]
    assert rbd_json(rbd_store_table, "ls", "--namespace", "tenant") == ["a.raw"]
    # Glance's rbd:// locations cannot name a namespace: no location rather than a wrong one
    # (rbd://fsid/pool/tenant/a.raw would be image "tenant", snapshot "a.raw" to Glance)
    assert "user.imagefs.location" not in os.listxattr(m.path("ns", "a.raw"))
    m.path("ns", "a.raw").unlink()
    assert rbd_json(rbd_store_table, "ls", "--namespace", "tenant") == []


def test_stores_command_shows_pool_facts_and_no_secrets(
        mount_factory: Any, ceph: Any, rbd_store_table: dict[str, Any]) -> None:
    m = mount_factory({"r": rbd_store_table})
    m.path("r", "x.raw").write_bytes(b"x" * 12345)
    r = subprocess.run([*IMAGEFS, "stores", str(m.config), "--json"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)["stores"]
    props = row["properties"]
    assert props["fsid"] == ceph.fsid and props["pool"] == rbd_store_table["pool"]
    assert (props["images"], props["bytes"]) == (1, 12345)
    key = [ln.split("=", 1)[1].strip() for ln in Path(ceph.keyring).read_text().splitlines()
           if ln.strip().startswith("key")]
    assert not any(k in r.stdout for k in key)


# ------------------------------------------------------------------------------- interchange
def test_image_written_through_imagefs_is_an_ordinary_rbd_image(
        mount_factory: Any, rbd_store_table: dict[str, Any], tmp_path: Path) -> None:
    m = mount_factory({"r": rbd_store_table})
    src = tmp_path / "w.raw"
    digest = make_file(src, 9 * MiB + 4321, "written")
    sh("cp", src, m.path("r", "w.raw"))
    os.chmod(m.path("r", "w.raw"), 0o600)
    os.utime(m.path("r", "w.raw"), (1_600_000_000, 1_600_000_000))
    assert listed(rbd_store_table) == ["w.raw"], "upload images left behind or wrong name"
    info = rbd_json(rbd_store_table, "info", "w.raw")
    assert info["size"] == 9 * MiB + 4321
    out = tmp_path / "exported.raw"
    rbd(rbd_store_table, "export", "w.raw", out)
    assert sha256(out) == digest
    meta = rbd_json(rbd_store_table, "image-meta", "list", "w.raw")
    assert meta["imagefs.mode"] == "600" and float(meta["imagefs.mtime"]) == 1_600_000_000
    assert meta["imagefs.os_hash_algo"] == "sha512"
    assert meta["imagefs.os_hash_value"] == sh("sha512sum", src).stdout.split()[0]
    # librbd reads the same bytes at an odd offset
    import rados
    import rbd as librbd

    cluster = rados.Rados(conffile=rbd_store_table["conf"], rados_id=rbd_store_table["user"],
                          conf={"keyring": rbd_store_table["keyring"]})
    cluster.connect(timeout=30)
    try:
        with cluster.open_ioctx(rbd_store_table["pool"]) as ioctx, \
                librbd.Image(ioctx, "w.raw", read_only=True) as image:
            assert image.read(5 * MiB + 3, 70000) == src.read_bytes()[5 * MiB + 3:
                                                                      5 * MiB + 70003]
    finally:
        cluster.shutdown()


def test_image_made_with_rbd_cli_reads_through_imagefs(
        mount_factory: Any, rbd_store_table: dict[str, Any], tmp_path: Path) -> None:
    src = tmp_path / "cli.raw"
    digest = make_file(src, 6 * MiB + 99, "cli")
    rbd(rbd_store_table, "import", src, "cli.raw")
    rbd(rbd_store_table, "create", "--size", "8M", "empty.raw")
    m = mount_factory({"r": rbd_store_table})
    assert sorted(os.listdir(m.path("r"))) == ["cli.raw", "empty.raw"]
    st = os.stat(m.path("r", "cli.raw"))
    assert st.st_size == 6 * MiB + 99 and st.st_mode & 0o777 == 0o644
    assert sha256(m.path("r", "cli.raw")) == digest
    assert m.path("r", "empty.raw").read_bytes() == bytes(8 * MiB)
    # and an image the CLI made is replaced through imagefs like any other
    m.path("r", "empty.raw").write_bytes(b"now full")
    assert sorted(listed(rbd_store_table)) == ["cli.raw", "empty.raw"]
    out = tmp_path / "e.raw"
    rbd(rbd_store_table, "export", "empty.raw", out)
    assert out.read_bytes() == b"now full"


# ------------------------------------------------------------------------------- glance layout
def test_glance_layout_snapshot_and_location(
        mount_factory: Any, rbd_store_table: dict[str, Any], tmp_path: Path) -> None:
    tool("ceph")
    table = {**rbd_store_table, "glance_layout": True}
    m = mount_factory({"g": table})
    src = tmp_path / "g.raw"
    make_file(src, 5 * MiB, "glance")
    sh("cp", src, m.path("g", "cirros.raw"))
    snaps = rbd_json(table, "snap", "ls", "cirros.raw")
    assert [s["name"] for s in snaps] == ["snap"]
    assert rbd_json(table, "info", "cirros.raw@snap")["protected"] == "true"
    fsid = sh("ceph", "-c", table["conf"], "--keyring", table["keyring"], "--id",
              table["user"], "fsid").stdout.strip()
    assert os.getxattr(m.path("g", "cirros.raw"), "user.imagefs.location").decode() == \
        f"rbd://{fsid}/{table['pool']}/cirros.raw/snap"
    # the snapshot holds the published bytes, as Glance/Nova will read them
    out = tmp_path / "snap.raw"
    rbd(table, "export", "cirros.raw@snap", out)
    sh("cmp", src, out)
    # replacing it: the new image comes with its own protected snap, the old one is gone
    make_file(src, 3 * MiB + 5, "glance v2")
    sh("cp", src, m.path("g", "cirros.raw"))
    assert listed(table) == ["cirros.raw"]
    assert rbd_json(table, "info", "cirros.raw@snap")["protected"] == "true"
    out.unlink()
    rbd(table, "export", "cirros.raw@snap", out)
    sh("cmp", src, out)
    # rename keeps the snapshot; the location follows the name
    os.rename(m.path("g", "cirros.raw"), m.path("g", "cirros2.raw"))
    assert [s["name"] for s in rbd_json(table, "snap", "ls", "cirros2.raw")] == ["snap"]
    assert os.getxattr(m.path("g", "cirros2.raw"), "user.imagefs.location").decode() == \
        f"rbd://{fsid}/{table['pool']}/cirros2.raw/snap"
    # delete unprotects and removes the snapshot first
    m.path("g", "cirros2.raw").unlink()
    assert listed(table) == []


def test_image_with_clones_is_never_deleted_or_replaced(
        mount_factory: Any, rbd_store_table: dict[str, Any], tmp_path: Path) -> None:
    table = {**rbd_store_table, "glance_layout": True}
    m = mount_factory({"g": table})
    p = m.path("g", "base.raw")
    p.write_bytes(b"base" * 300_000)
    pool = table["pool"]
    rbd(table, "clone", f"{pool}/base.raw@snap", f"{pool}/vm-disk")
    with pytest.raises(OSError) as e:
        p.unlink()
    assert e.value.errno == errno.EBUSY
    with pytest.raises(OSError) as e:  # replacing it would orphan the clone just the same
        p.write_bytes(b"other")
    assert e.value.errno == errno.EBUSY
    out = tmp_path / "base.raw"
    rbd(table, "export", "base.raw", out)
    assert out.read_bytes() == b"base" * 300_000
    # The kernel sends RELEASE after close() returned, and publish.py tries to publish once more
    # then: until that ends the mount shows the failed writer's size and its upload image
    # exists. Wait for the release (ordering only, no timing claim).
    deadline = time.monotonic() + 30
    while os.stat(p).st_size != 1_200_000 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert p.read_bytes() == b"base" * 300_000
    assert sorted(listed(table)) == ["base.raw", "vm-disk"]
    assert "has clones" in m.log_text()
    # once the clone is gone the image goes, snapshot and all
    rbd(table, "rm", "vm-disk")
    p.unlink()
    assert listed(table) == []


# ------------------------------------------------------------------------------- sparseness
def test_sparse_stays_sparse(mount_factory: Any, rbd_store_table: dict[str, Any],
                             tmp_path: Path) -> None:
    m = mount_factory({"r": rbd_store_table})
    # zeros written into a fresh image allocate nothing
    sh("dd", "if=/dev/zero", f"of={m.path('r', 'zeros.raw')}", "bs=4M", "count=32",
       "status=none")
    assert os.stat(m.path("r", "zeros.raw")).st_size == 128 * MiB
    assert used_bytes(rbd_store_table, "zeros.raw") == 0
    # a sparse raw file copied in allocates only the objects its data touches (4 MiB each)
    src = tmp_path / "sparse.raw"
    with open(src, "wb") as f:
        f.truncate(256 * MiB)
        for off in (0, 100 * MiB + 12345, 256 * MiB - 4096):
            f.seek(off)
            f.write(os.urandom(4096))
    sh("cp", src, m.path("r", "sparse.raw"))
    sh("cmp", src, m.path("r", "sparse.raw"))
    assert used_bytes(rbd_store_table, "sparse.raw") <= 3 * 4 * MiB
    # zeros written *below* data already there (random writes) allocate nothing either
    with open(m.path("r", "mixed.raw"), "wb") as f:
        f.seek(60 * MiB)
        f.write(b"tail" * 1024)
        f.seek(0)
        for _ in range(10):
            f.write(bytes(4 * MiB))
    assert used_bytes(rbd_store_table, "mixed.raw") <= 4 * MiB
    with open(m.path("r", "mixed.raw"), "rb") as f:
        f.seek(60 * MiB)
        assert f.read(4096) == b"tail" * 1024


# ------------------------------------------------------------------------------- consistency
def test_replaced_while_open_gives_old_bytes_or_eio(
        mount_factory: Any, rbd_store_table: dict[str, Any], tmp_path: Path) -> None:
    m = mount_factory({"r": rbd_store_table}, cache={"readahead": "1MiB"})
    old_src, new_src = tmp_path / "old.raw", tmp_path / "new.raw"
    make_file(old_src, 64 * MiB, "old")
    make_file(new_src, 64 * MiB, "new")
    old, new = old_src.read_bytes(), new_src.read_bytes()
    sh("cp", old_src, m.path("r", "v.raw"))
    outcomes = []
    with open(m.path("r", "v.raw"), "rb", buffering=0) as f:
        assert f.read(65536) == old[:65536]
        # Overwriting it in place (O_TRUNC) would make the kernel end this read early: refused.
        r = subprocess.run([sys.executable, "-c", "import shutil,sys; shutil.copyfile("
                            "sys.argv[1], sys.argv[2])", new_src, m.path("r", "v.raw")],
                           capture_output=True, text=True)
        assert r.returncode != 0 and "Text file busy" in r.stderr, r.stderr
        # replaced by another process, through the same mount, the safe way
        sh(sys.executable, "-c", "import shutil,sys,os; shutil.copyfile(sys.argv[1], "
           "sys.argv[2] + '.tmp'); os.rename(sys.argv[2] + '.tmp', sys.argv[2])",
           new_src, m.path("r", "v.raw"))
        for off in (8 * MiB, 40 * MiB + 4096, 63 * MiB):
            try:
                f.seek(off)
                got = f.read(MiB)
            except OSError as e:
                assert e.errno == errno.EIO
                outcomes.append("EIO")
                continue
            assert got == old[off:off + len(got)], f"bytes at {off} are not the old image's"
            assert got != new[off:off + len(got)]
            outcomes.append("old")
    assert sha256(m.path("r", "v.raw")) == sha256(new_src)
    assert listed(rbd_store_table) == ["v.raw"], "the old image was not removed"
    print("reader outcomes after the replace:", outcomes)


def test_store_reads_are_pinned_to_their_version(rbd_store_table: dict[str, Any],
                                                 tmp_path: Path) -> None:
    """At the store API: a replaced or deleted image raises Changed, never zeros or new bytes."""
    store = open_store(rbd_store_table, tmp_path)
    try:
        up = store.upload("p.raw", None)
        up.write(0, b"1" * (3 * MiB))
        v1 = up.commit({})
        assert store.read_range("p.raw", v1.version, MiB, 10) == b"1" * 10
        assert store.read_range("p.raw", v1.version, 3 * MiB - 4, 100) == b"1" * 4  # short at end
        assert store.read_range("p.raw", v1.version, 3 * MiB, 100) == b""
        up = store.upload("p.raw", None)
        up.write(0, b"2" * (3 * MiB))
        v2 = up.commit({})
        assert v2.version != v1.version
        with pytest.raises(Changed):
            store.read_range("p.raw", v1.version, MiB, 10)
        assert store.read_range("p.raw", v2.version, MiB, 10) == b"2" * 10
        store.delete("p.raw")
        with pytest.raises(Changed):  # the cached handle would read zeros: must not
            store.read_range("p.raw", v2.version, MiB, 10)
        assert listed(rbd_store_table) == []
    finally:
        store.close()


# ------------------------------------------------------------------------------- crashes
def test_killed_daemon_leftovers_removed_at_next_mount(
        mount_factory: Any, rbd_store_table: dict[str, Any]) -> None:
    m = mount_factory({"r": rbd_store_table})
    m.path("r", "img.raw").write_bytes(b"published" * 1000)
    kill_daemon_mid_write(m, m.path("r", "img.raw"), hold=30)
    names = listed(rbd_store_table)
    assert "img.raw" in names and any(n.startswith(".imagefs-") for n in names), names
    r = subprocess.run([*IMAGEFS, "mount", str(m.config), str(m.root), "-o", f"log={m.log}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert listed(rbd_store_table) == ["img.raw"]
    assert m.path("r", "img.raw").read_bytes() == b"published" * 1000


def test_image_moved_aside_by_a_crashed_replace_is_restored(
        mount_factory: Any, rbd_store_table: dict[str, Any], tmp_path: Path) -> None:
    """A crash between "rename old aside" and "rename new in" must not lose the old image."""
    from imagefs.stores.owners import host
    from imagefs.stores.rbd.layout import RESTORE_KEY

    gone = subprocess.Popen(["true"])
    gone.wait()
    aside = f".imagefs-{host()}_{gone.pid}_0_deadbeef-old"
    src = tmp_path / "keep.raw"
    digest = make_file(src, 2 * MiB, "keep")
    rbd(rbd_store_table, "import", src, aside)
    rbd(rbd_store_table, "image-meta", "set", aside, RESTORE_KEY, "keep.raw")
    m = mount_factory({"r": rbd_store_table})
    assert listed(rbd_store_table) == ["keep.raw"]
    assert sha256(m.path("r", "keep.raw")) == digest
    assert RESTORE_KEY not in rbd_json(rbd_store_table, "image-meta", "list", "keep.raw")


@pytest.mark.parametrize("left", ["same image", "no image"])
def test_old_image_is_restored_after_a_rename_cut_short_inside_librbd(
        left: str, mount_factory: Any, rbd_store_table: dict[str, Any], tmp_path: Path) -> None:
    """librbd renames in several RADOS writes: a kill between them leaves ``rbd_id.<name>``
    behind while the directory lists the image under the other name (test_crash_rename found
    it: the old image's restore then failed with "exists", and it was removed as garbage).
    Both leftovers a crashed replace can make: the id object naming the image moved aside
    (killed inside step 1), or naming an upload that cleanup removes (killed inside step 2)."""
    import struct

    import rados

    from imagefs.stores.owners import host
    from imagefs.stores.rbd.layout import RESTORE_KEY

    gone = subprocess.Popen(["true"])
    gone.wait()
    aside = f".imagefs-{host()}_{gone.pid}_0_deadbeef-old"
    src = tmp_path / "keep.raw"
    digest = make_file(src, 2 * MiB, "keep")
    rbd(rbd_store_table, "import", src, "keep.raw")
    rbd(rbd_store_table, "image-meta", "set", "keep.raw", RESTORE_KEY, "keep.raw")
    t = rbd_store_table
    with rados.Rados(conffile=t["conf"], rados_id=t["user"],
                     conf={"keyring": t["keyring"]}) as cluster, \
            cluster.open_ioctx(t["pool"]) as io:
        stale = io.read("rbd_id.keep.raw", 4096, 0)
        rbd(rbd_store_table, "rename", "keep.raw", aside)
        if left == "no image":
            stale = struct.pack("<I", 12) + b"0123456789ab"
        io.write_full("rbd_id.keep.raw", stale)
    assert listed(rbd_store_table) == [aside]
    m = mount_factory({"r": rbd_store_table})
    assert listed(rbd_store_table) == ["keep.raw"]
    assert sha256(m.path("r", "keep.raw")) == digest
    assert "rbd_id.keep.raw, left without its image" in m.log_text()


def test_live_uploads_are_not_cleaned(rbd_store_table: dict[str, Any], tmp_path: Path) -> None:
    """cleanup_leftovers of a second store instance spares the uploads of a running process."""
    a = open_store(rbd_store_table, tmp_path, "a")
    b = open_store(rbd_store_table, tmp_path, "b")
    try:
        up = a.upload("live.raw", None)
        up.write(0, b"x" * 4096)
        assert b.cleanup_leftovers() == 0
        assert up.commit({}).size == 4096
        assert listed(rbd_store_table) == ["live.raw"]
    finally:
        a.close()
        b.close()


def test_unreachable_cluster_is_an_error_not_a_hang(tmp_path: Path) -> None:
    conf = tmp_path / "dead.conf"
    conf.write_text("[global]\nmon host = 127.0.0.1:1\nauth supported = none\n")
    table = {"type": "rbd", "conf": str(conf), "pool": "rbd", "timeout": 3.0}
    cfg = config_mod.parse({"stores": {"dead": table}}, tmp_path / "d.toml")
    store = build(cfg.stores[0])
    t0 = time.monotonic()
    with pytest.raises(BackendError) as e:
        store.open()
    assert time.monotonic() - t0 < 60
    assert "dead" in str(e.value)


_PROBE = """
import errno, os, sys
path, op = sys.argv[1], sys.argv[2]
try:
    if op == "read":
        with open(path, "rb", buffering=0) as f:
            f.seek(6 << 20)
            f.read(1 << 20)
    elif op == "list":
        os.listdir(path)
    else:
        with open(path, "wb") as f:
            f.write(b"w" * 65536)
    print("ok")
except OSError as e:
    print(errno.errorcode.get(e.errno, e.errno))
"""


def test_cluster_dying_under_a_mount_gives_eio_not_a_hang(mount_factory: Any,
                                                          tmp_path: Path) -> None:
    """A private cluster, stopped under a live mount: every operation ends in EIO.

    The probes run as child processes with a generous guard, so a hang fails the test instead
    of hanging it; the bound itself is the store timeout (librados op timeouts).
    """
    import rbd as librbd

    from tests.backends import make

    private = make("ceph2", tmp_path / "private")
    private.start()
    try:
        info = private.info
        with rados_connection(info) as cluster:
            cluster.create_pool("p")
            with cluster.open_ioctx("p") as ioctx:
                librbd.RBD().pool_init(ioctx, True)
        m = mount_factory({"r": {**rbd_table(info, "p"), "timeout": 5.0}}, metadata_ttl=0)
        src = tmp_path / "d.raw"
        make_file(src, 8 * MiB, "dying")
        sh("cp", src, m.path("r", "d.raw"))
        with open(m.path("r", "d.raw"), "rb") as f:
            assert f.read(65536) == src.read_bytes()[:65536]
        private.stop()
        for target, op in ((m.path("r", "d.raw"), "read"), (m.path("r"), "list"),
                           (m.path("r", "new.raw"), "write")):
            r = subprocess.run([sys.executable, "-c", _PROBE, str(target), op],
                               capture_output=True, text=True, timeout=300)
            assert r.stdout.strip() == "EIO", f"{op}: {r.stdout} {r.stderr}"
    finally:
        private.stop()


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    for table, key in (({"type": "rbd", "pool": "p"}, "conf"),
                       ({"type": "rbd", "conf": "/x"}, "pool"),
                       ({"type": "rbd", "conf": "/x", "pool": "p", "namespace": "ns",
                         "glance_layout": True}, "glance_layout")):
        with pytest.raises(config_mod.ConfigError) as e:
            config_mod.parse({"stores": {"r": table}}, tmp_path / "c.toml")
        assert f"stores.r.{key}" in str(e.value)


# ------------------------------------------------------------------------------- concurrency
# The bridge abandons a call that passes its deadline, so a store call on an upload may still
# run when the next one arrives. These drive the store from threads, as that leaves them.
class _SlowImage:
    """Wraps an upload's librbd Image: chosen methods sleep first (a stalled OSD, say)."""

    def __init__(self, image: Any, delays: dict[str, float]) -> None:
        self._image, self._delays = image, delays

    def __getattr__(self, attr: str) -> Any:
        fn = getattr(self._image, attr)
        delay = self._delays.get(attr)
        if not delay:
            return fn

        def slow(*args: Any, **kwargs: Any) -> Any:
            time.sleep(delay)
            return fn(*args, **kwargs)
        return slow


def hidden(table: dict[str, Any]) -> list[str]:
    return [n for n in listed(table) if n.startswith(".imagefs-")]


def test_abandoned_write_and_truncate_never_race_in_librbd(
        rbd_store_table: dict[str, Any], tmp_path: Path) -> None:
    """A write still running while truncate/another write come: serialized, nothing lost.

    Unserialized, librbd aborted the whole process (object map assertion) or a racing
    shrink zeroed written blocks.
    """
    import threading

    store = open_store(rbd_store_table, tmp_path)
    data = os.urandom(MiB)
    try:
        for i in range(4):
            up = store.upload(f"t{i}.raw", None)

            def writer(k: int, up: Any = up) -> None:
                for j in range(12):
                    up.write((j * 2 + k) * MiB, data)

            threads = [threading.Thread(target=writer, args=(k,)) for k in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert all(up.read(j * MiB, MiB) == data for j in range(24)), "a write was lost"
            # an abandoned writer and the next request's truncate(0), on one upload
            t = threading.Thread(target=lambda up=up: [up.write(j * 4 * MiB, data * 4)
                                                        for j in range(8)])
            t.start()
            for _ in range(10):
                up.truncate(0)
                time.sleep(0.003)
            t.join()
            up.truncate(3 * MiB)
            got = up.read(0, 3 * MiB)
            assert len(got) == 3 * MiB
            up.abort()
        assert hidden(rbd_store_table) == []
    finally:
        store.close()


def test_call_that_outlives_its_deadline_poisons_the_upload(
        rbd_store_table: dict[str, Any], tmp_path: Path) -> None:
    """A late write must not count: the upload refuses everything after it, nothing is published."""
    store = open_store({**rbd_store_table, "timeout": 1.0}, tmp_path)
    try:
        up = store.upload("late.raw", None)
        up.write(0, b"a" * 4096)
        up.image = _SlowImage(up.image, {"write": 1.2})
        with pytest.raises(BackendError):
            up.write(4096, b"b" * 4096)  # ended after its deadline: the bridge gave up on it
        assert up.size == 4096
        for call in (lambda: up.write(0, b"c"), lambda: up.truncate(10), up.flush,
                     lambda: up.commit({})):
            with pytest.raises(BackendError):
                call()
        up.abort()
        up.abort()  # twice is fine
        assert listed(rbd_store_table) == []
    finally:
        store.close()


def test_commit_publishes_the_truncated_size(rbd_store_table: dict[str, Any],
                                             tmp_path: Path) -> None:
    store = open_store(rbd_store_table, tmp_path)
    try:
        up = store.upload("s.raw", None)
        up.write(0, b"x" * 10000)
        up.truncate(4096)
        assert up.commit({}).size == 4096
        assert rbd_json(rbd_store_table, "info", "s.raw")["size"] == 4096
    finally:
        store.close()


def test_abort_during_commit_before_the_rename_publishes_nothing(
        rbd_store_table: dict[str, Any], tmp_path: Path) -> None:
    import threading

    table = {**rbd_store_table, "glance_layout": True, "timeout": 5.0}
    store = open_store(table, tmp_path)
    try:
        up = store.upload("a.raw", None)
        up.write(0, b"z" * 8192)
        up.image = _SlowImage(up.image, {"flush": 1.0})
        errors: list[BaseException] = []

        def commit() -> None:
            try:
                up.commit({})
            except BaseException as e:
                errors.append(e)

        t = threading.Thread(target=commit)
        t.start()
        time.sleep(0.3)
        up.abort()  # the commit was abandoned by the bridge; the writer aborts
        t.join()
        assert errors and isinstance(errors[0], BackendError)
        assert listed(table) == []
    finally:
        store.close()


def test_abort_during_commit_after_the_check_leaves_the_published_image_intact(
        rbd_store_table: dict[str, Any], tmp_path: Path) -> None:
    """abort arriving while commit renames: the published image keeps its protected snap."""
    import threading

    table = {**rbd_store_table, "glance_layout": True, "timeout": 5.0}
    store = open_store(table, tmp_path)
    try:
        up = store.upload("b.raw", None)
        up.write(0, b"y" * 8192)
        rename = store.client.rename  # type: ignore[attr-defined]

        def slow_rename(old: str, new: str) -> None:
            time.sleep(1.0)
            rename(old, new)

        store.client.rename = slow_rename  # type: ignore[attr-defined]
        result: list[Any] = []
        t = threading.Thread(target=lambda: result.append(up.commit({})))
        t.start()
        time.sleep(0.3)
        up.abort()
        t.join()
        assert result and result[0].size == 8192
        assert listed(table) == ["b.raw"]
        assert rbd_json(table, "info", "b.raw@snap")["protected"] == "true"
        out = tmp_path / "b.raw"
        rbd(table, "export", "b.raw", out)
        assert out.read_bytes() == b"y" * 8192
    finally:
        store.close()


# ------------------------------------------------------------------------------- refusals
def test_foreign_snapshots_refuse_delete_and_replace_untouched(
        rbd_store_table: dict[str, Any], tmp_path: Path) -> None:
    from imagefs.stores.base import Busy

    table = {**rbd_store_table, "glance_layout": True}
    store = open_store(table, tmp_path)
    try:
        up = store.upload("f.raw", None)
        up.write(0, b"f" * 4096)
        up.commit({})
        rbd(table, "snap", "create", "f.raw@backup")
        with pytest.raises(Busy):
            store.delete("f.raw")
        snaps = {s["name"]: s for s in rbd_json(table, "snap", "ls", "f.raw")}
        assert set(snaps) == {"snap", "backup"}  # Glance's snap not stripped first
        assert rbd_json(table, "info", "f.raw@snap")["protected"] == "true"
        up = store.upload("f.raw", None)
        up.write(0, b"g" * 4096)
        with pytest.raises(Busy):
            up.commit({})
        assert listed(table) == ["f.raw"], "refused replace left images behind"
        out = tmp_path / "f.raw"
        rbd(table, "export", "f.raw", out)
        assert out.read_bytes() == b"f" * 4096
    finally:
        store.close()


def test_watched_image_is_not_replaced(ceph: Any, rbd_store_table: dict[str, Any],
                                       tmp_path: Path) -> None:
    import rbd as librbd

    from imagefs.stores.base import Busy

    store = open_store(rbd_store_table, tmp_path)
    try:
        up = store.upload("w.raw", None)
        up.write(0, b"1" * 4096)
        v1 = up.commit({})
        with rados_connection(ceph) as cluster, \
                cluster.open_ioctx(rbd_store_table["pool"]) as ioctx, \
                librbd.Image(ioctx, "w.raw"):  # read-write: a watcher, like a VM
            up = store.upload("w.raw", None)
            up.write(0, b"2" * 4096)
            with pytest.raises(Busy):
                up.commit({})
        assert listed(rbd_store_table) == ["w.raw"]
        assert store.stat("w.raw").version == v1.version
        # our own read handles do not count
        assert store.read_range("w.raw", v1.version, 0, 4) == b"1111"
        up = store.upload("w.raw", None)
        up.write(0, b"3" * 4096)
        assert up.commit({}).version != v1.version
        assert listed(rbd_store_table) == ["w.raw"]
    finally:
        store.close()


def test_read_of_an_image_deleted_elsewhere_is_changed_not_notfound(
        rbd_store_table: dict[str, Any], tmp_path: Path) -> None:
    a = open_store(rbd_store_table, tmp_path, "a")
    b = open_store(rbd_store_table, tmp_path, "b")
    try:
        up = a.upload("d.raw", None)
        up.write(0, b"d" * 4096)
        v = up.commit({})
        b.delete("d.raw")
        with pytest.raises(Changed):  # no handle cached in b: the open itself finds nothing
            b.read_range("d.raw", v.version, 0, 10)
    finally:
        a.close()
        b.close()


# ------------------------------------------------------------------------------- blocklisting
def test_blocklisted_client_reconnects(ceph: Any, rbd_store_table: dict[str, Any],
                                       tmp_path: Path) -> None:
    import re

    store = open_store({**rbd_store_table, "timeout": 5.0}, tmp_path)
    addr = re.search(r"([0-9.]+:\d+/\d+)", store.client.cluster.get_addrs()).group(1)  # type: ignore
    blocklist = ["ceph", "-c", str(ceph.conf), "--keyring", str(ceph.keyring), "--id",
                 str(ceph.user), "osd", "blocklist"]
    try:
        up = store.upload("bl.raw", None)
        up.write(0, b"b" * 4096)
        v = up.commit({})
        assert store.read_range("bl.raw", v.version, 0, 4) == b"bbbb"
        tool("ceph")
        sh(*blocklist, "add", addr)
        failures = 0
        deadline = time.monotonic() + 60
        while True:  # the first call(s) fail with ESHUTDOWN and trigger the reconnect
            try:
                assert store.read_range("bl.raw", v.version, 0, 4) == b"bbbb"
                break
            except BackendError:
                failures += 1
                assert time.monotonic() < deadline, "never reconnected"
                time.sleep(0.2)
        assert failures <= 2
        assert addr not in store.client.cluster.get_addrs()  # type: ignore[attr-defined]
        assert store.stat("bl.raw").version == v.version
        up = store.upload("bl2.raw", None)
        up.write(0, b"c" * 4096)
        assert up.commit({}).size == 4096
    finally:
        store.close()
        sh(*blocklist, "rm", addr, check=False)


# ------------------------------------------------------------------------------- replacing
def test_rename_that_failed_after_happening_is_not_rolled_back(
        rbd_store_table: dict[str, Any], tmp_path: Path) -> None:
    """Step 2's rename raises (a timeout) although it happened: ids decide, nothing is undone."""
    store = open_store(rbd_store_table, tmp_path)
    try:
        up = store.upload("r.raw", None)
        up.write(0, b"old" * 1000)
        up.commit({})
        rename = store.client.rename  # type: ignore[attr-defined]

        def lying_rename(old: str, new: str) -> None:
            rename(old, new)
            if new == "r.raw" and old.startswith(".imagefs-") and not old.endswith("-old"):
                raise OSError(errno.ETIMEDOUT, "timed out (but done)")

        store.client.rename = lying_rename  # type: ignore[attr-defined]
        up = store.upload("r.raw", None)
        up.write(0, b"new" * 1000)
        info = up.commit({})
        assert listed(rbd_store_table) == ["r.raw"]
        assert store.read_range("r.raw", info.version, 0, 3000) == b"new" * 1000
    finally:
        store.close()


def test_aside_image_is_untagged_once_replaced(rbd_store_table: dict[str, Any],
                                              tmp_path: Path) -> None:
    """After step 2, a crash (here: a failed removal) must never bring the old image back."""
    from imagefs.stores.rbd.layout import ASIDE_KEY, RESTORE_KEY

    store = open_store(rbd_store_table, tmp_path)
    try:
        up = store.upload("u.raw", None)
        up.write(0, b"1" * 4096)
        up.commit({})
        remove = store.replacer.remove  # type: ignore[attr-defined]

        def no_remove(name: str) -> None:
            if name.endswith("-old"):
                raise BackendError("injected")
            remove(name)

        store.replacer.remove = no_remove  # type: ignore[attr-defined]
        up = store.upload("u.raw", None)
        up.write(0, b"2" * 4096)
        up.commit({})
        (aside,) = hidden(rbd_store_table)
        meta = rbd_json(rbd_store_table, "image-meta", "list", aside)
        assert RESTORE_KEY not in meta and ASIDE_KEY in meta
        rbd(rbd_store_table, "rm", aside)
    finally:
        store.close()


def test_other_hosts_aside_images_are_judged_by_when_moved_aside(
        rbd_store_table: dict[str, Any], tmp_path: Path) -> None:
    from imagefs.stores.rbd.layout import ASIDE_KEY, RESTORE_KEY

    fresh, stale = ".imagefs-elsewhere_1_1_aaaa-old", ".imagefs-elsewhere_1_1_bbbb-old"
    for name, target in ((fresh, "fresh.raw"), (stale, "stale.raw")):
        rbd(rbd_store_table, "create", "--size", "1M", name)
        rbd(rbd_store_table, "image-meta", "set", name, RESTORE_KEY, target)
    time.sleep(2.5)  # both images are older than leftover_age...
    rbd(rbd_store_table, "image-meta", "set", fresh, ASIDE_KEY, repr(time.time()))
    rbd(rbd_store_table, "image-meta", "set", stale, ASIDE_KEY, repr(time.time() - 100))
    store = open_store({**rbd_store_table, "leftover_age": 2.0}, tmp_path)
    try:
        assert store.cleanup_leftovers() == 1  # ...but only one was moved aside that long ago
        assert sorted(listed(rbd_store_table)) == sorted([fresh, "stale.raw"])
    finally:
        store.close()


def test_close_waits_for_reads_in_flight(rbd_store_table: dict[str, Any],
                                         tmp_path: Path) -> None:
    import threading

    store = open_store({**rbd_store_table, "timeout": 5.0}, tmp_path)
    up = store.upload("c.raw", None)
    up.write(0, b"c" * 4096)
    v = up.commit({})
    image_id = store.client.image_id  # type: ignore[attr-defined]

    def slow_id(name: str) -> str:
        time.sleep(1.0)  # the check after the read: the handle is in use meanwhile
        return image_id(name)

    store.client.image_id = slow_id  # type: ignore[attr-defined]
    got: list[Any] = []

    def read() -> None:
        try:
            got.append(store.read_range("c.raw", v.version, 0, 4))
        except BaseException as e:
            got.append(e)

    t = threading.Thread(target=read)
    t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    store.close()
    assert time.monotonic() - t0 >= 0.4, "close did not wait for the read"
    t.join()
    assert got == [b"cccc"]
