"""One mount over every store type at once: copies across all of them, discovery, locations,
hashes, and replication with a failing destination (issue 7's acceptance tests)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_common import MiB, make_file, sh
from tests.mounting import IMAGEFS, Mount


@pytest.fixture
def all_stores(mount_factory: Any, nginx: Any, local_store_table: dict[str, Any],
               s3_store_table: dict[str, Any], rbd_store_table: dict[str, Any],
               swift_store_table: dict[str, Any], tmp_path: Path
               ) -> tuple[Mount, dict[str, dict[str, Any]]]:
    served = nginx.root / f"mirror-{tmp_path.name}"
    served.mkdir()
    make_file(served / "cirros.raw", 3 * MiB + 1, "mirror")
    tables = {
        "local": {**local_store_table, "default": True, "description": "local disk"},
        "mirror": {"type": "http", "url": f"{nginx.url}{served.name}/"},
        "s3": {**s3_store_table, "description": "RGW S3", "weight": 5},
        "rbd": {**rbd_store_table, "glance_layout": True},
        "swift": swift_store_table,
    }
    return mount_factory(tables), tables


def test_copy_across_every_store(all_stores: tuple[Mount, dict[str, Any]], tmp_path: Path
                                 ) -> None:
    m, _ = all_stores
    src = tmp_path / "vm.raw"
    digest = make_file(src, 11 * MiB + 77, "chain")
    sh("cp", src, m.path("local", "vm.raw"))
    prev = m.path("local", "vm.raw")
    for i, sid in enumerate(["swift", "rbd", "s3", "swift", "local"]):
        nxt = m.path(sid, f"hop{i}.raw")
        sh("cp", prev, nxt)
        assert sh("sha256sum", nxt).stdout.split()[0] == digest, (prev, nxt)
        prev = nxt
    sh("cp", m.path("mirror", "cirros.raw"), m.path("rbd", "cirros.raw"))
    sh("cmp", m.path("mirror", "cirros.raw"), m.path("rbd", "cirros.raw"))


def test_discovery_locations_and_hashes(all_stores: tuple[Mount, dict[str, Any]],
                                        ceph: Any) -> None:
    m, tables = all_stores
    r = subprocess.run([*IMAGEFS, "stores", str(m.config), "--json"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = {s["id"]: s for s in json.loads(r.stdout)["stores"]}
    assert set(rows) == {"local", "mirror", "s3", "rbd", "swift"}
    assert rows["local"]["default"] is True and rows["mirror"]["read-only"] is True
    assert rows["s3"]["weight"] == 5 and rows["s3"]["description"] == "RGW S3"
    secret = Path(tables["s3"]["secret_access_key_file"]).read_text().strip()
    assert secret not in r.stdout
    data = os.urandom(2 * MiB + 5)
    for sid in ("local", "s3", "rbd", "swift"):
        p = m.path(sid, "h.raw")
        p.write_bytes(data)
        xa = {k.removeprefix("user.imagefs."): os.getxattr(p, k).decode()
              for k in os.listxattr(p)}
        assert xa["os_hash_algo"] == "sha512", sid
        assert xa["os_hash_value"] == hashlib.sha512(data).hexdigest(), sid
        assert xa["checksum"] == hashlib.md5(data).hexdigest(), sid
        loc = xa["location"]
        assert secret not in loc
        scheme = {"local": "file://", "s3": "s3", "rbd": "rbd://", "swift": "swift"}[sid]
        assert loc.startswith(scheme), (sid, loc)
    pool = tables["rbd"]["pool"]
    assert os.getxattr(m.path("rbd", "h.raw"), "user.imagefs.location").decode() == \
        f"rbd://{ceph.fsid}/{pool}/h.raw/snap"
    assert os.getxattr(m.path("mirror", "cirros.raw"), "user.imagefs.location").decode() \
        .startswith("http://127.0.0.1:")


def test_copy_to_all_stores_with_a_failing_destination(
        all_stores: tuple[Mount, dict[str, Any]], tmp_path: Path) -> None:
    m, tables = all_stores
    make_file(m.path("local", "base.raw"), 6 * MiB, "base")  # written through the mount
    r = subprocess.run([*IMAGEFS, "copy", str(m.path("local", "base.raw")), "--all-stores"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    for sid in ("s3", "rbd", "swift"):
        sh("cmp", m.path("local", "base.raw"), m.path(sid, "base.raw"))
    # make the local store's backing directory vanish: writes there fail
    make_file(m.path("s3", "only-s3.raw"), 2 * MiB, "o")
    local = Path(tables["local"]["path"])
    for n in os.listdir(local):
        os.unlink(local / n)
    os.rmdir(local)
    r = subprocess.run([*IMAGEFS, "copy", str(m.path("s3", "only-s3.raw")), "--to",
                        "local,rbd,swift"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stdout + r.stderr
    assert not m.path("rbd", "only-s3.raw").exists()
    assert not m.path("swift", "only-s3.raw").exists()
    r = subprocess.run([*IMAGEFS, "copy", str(m.path("s3", "only-s3.raw")), "--to",
                        "local,rbd,swift", "--allow-partial"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 4, r.stdout + r.stderr
    sh("cmp", m.path("s3", "only-s3.raw"), m.path("rbd", "only-s3.raw"))
    sh("cmp", m.path("s3", "only-s3.raw"), m.path("swift", "only-s3.raw"))
    r = subprocess.run([*IMAGEFS, "copy", str(m.path("s3", "only-s3.raw")), "--to", "mirror"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "read-only" in r.stderr
