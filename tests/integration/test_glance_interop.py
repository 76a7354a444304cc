"""Images Glance wrote and images imagefs wrote are interchangeable, proven against Glance's own
store drivers (Debian's python3-glance-store, the code glance-api runs).

The Glance side is ``tests/glance_side.py``, run with Debian's ``/usr/bin/python3 -I`` in a clean
environment and set up in multi-store mode as glance-api sets it up, pointed at the directory,
Ceph pool, Swift container or S3 bucket the mount shows. For each store type (file, rbd with and
without glance_layout, swift on OpenStack Swift and on RGW, s3):

- Glance → imagefs: a small image and a large qcow2 (Glance's DLO on Swift, multipart on S3)
  added with ``add_with_multihash`` show under their ids with Glance's bytes and size, qemu-img
  reads the qcow2, and after chmod, touch and ``imagefs hash`` Glance still reads the same bytes
  and imagefs's hashes are Glance's.
- imagefs → Glance: a small image and a large one (an SLO on Swift, multipart on S3) copied in
  through the mount are read by glance_store from the location imagefs reports, with the bytes
  and hashes imagefs recorded.
- Locations: for Glance's images, imagefs's are glance_store's own strings (the credential-free
  ``user.imagefs.location`` is Glance's minus the credentials, the root-only
  ``trusted.imagefs.glance_location`` is Glance's exactly); where Glance has no form (an RBD image
  without the snapshot Glance reads) there is none, and ``imagefs location`` says so.
- Deletes both ways: what Glance deletes leaves the listing within the TTL; what imagefs deletes
  is gone for Glance, and the backend keeps nothing of it (segments, snapshots).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.backends.fixtures import s3_client, swift_connection
from tests.integration.test_common import MiB, sh
from tests.mounting import IMAGEFS, Mount, mount, tool, unmount

GLANCE_PYTHON = "/usr/bin/python3"
GLANCE_SIDE = Path(__file__).resolve().parents[1] / "glance_side.py"
GLANCE_XATTR = "trusted.imagefs.glance_location"
TTL = 1.0  # the mount's metadata_ttl: what Glance changes shows within it


@pytest.fixture(scope="module")
def glance_available() -> None:
    """glance_store and boto3 for Debian's python3 (tools/setup.sh installs them)."""
    r = subprocess.run([GLANCE_PYTHON, "-I", "-c", "import glance_store, boto3"],
                       capture_output=True, text=True, env=_clean_env(Path("/")))
    if r.returncode != 0:
        last = r.stderr.strip().splitlines()[-1:] or [f"exit status {r.returncode}"]
        msg = ("Debian's python3-glance-store and python3-boto3 are needed (tools/setup.sh): "
               + last[0])
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def _clean_env(home: Path) -> dict[str, str]:
    """What glance-api would have: no AWS_*, CEPH_*, ST_*/OS_*, no venv, no PYTHON* settings."""
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}


def glance(tmp_path: Path, stores: dict[str, dict[str, Any]], ops: list[dict[str, Any]]
           ) -> list[dict[str, Any]]:
    """Run ``ops`` with glance_store (see tests/glance_side.py); one result per operation."""
    work = Path(tempfile.mkdtemp(prefix="glance-", dir=tmp_path))
    req = work / "request.json"
    req.write_text(json.dumps({"workdir": str(work), "stores": stores, "ops": ops}))
    r = subprocess.run([GLANCE_PYTHON, "-I", str(GLANCE_SIDE), str(req)], capture_output=True,
                       text=True, timeout=300, env=_clean_env(work))
    assert r.returncode == 0, f"glance side failed:\n{r.stderr[-4000:]}"
    results: list[dict[str, Any]] = json.loads(r.stdout)["results"]
    return results


def ok(result: dict[str, Any]) -> dict[str, Any]:
    assert result["ok"], f"glance_store: {result['error']}: {result['message']}"
    return result


def without_credentials(location: str) -> str:
    """Glance's S3 location minus ``ACCESS:SECRET@``: what ``user.imagefs.location`` shows."""
    return re.sub(r"^(s3(?:\+https?)?://)[^/@]*:[^@]*@", r"\1", location)


def wait_for(check: Callable[[], bool], what: str, timeout: float = 10 * TTL + 5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting: {what}"
        time.sleep(0.2)


def imagefs_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*IMAGEFS, *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@dataclass
class Case:
    """One store as both sides see it."""

    table: dict[str, Any]  # imagefs's store table
    glance: dict[str, Any]  # glance_store's options for the same place ("type" first)
    small: int  # bytes: one PUT / plain object on every store
    large: int  # bytes: Glance's DLO or multipart, imagefs's SLO or multipart
    backend_names: Callable[[], list[str]]  # what the backend holds there, everything
    #: the parsed location fields glance_store must find for imagefs's image ``name``
    fields: Callable[[str], dict[str, str]]
    imagefs_has_location: bool = True  # False: rbd without glance_layout (no snapshot)
    #: checks the large images are what they claim (Glance's id, imagefs's name)
    shapes: Callable[[str, str], None] = lambda glance_large, ours_large: None


def interop(case: Case, tmp_path: Path) -> None:
    """The whole exchange (see the module docstring) on one store, ``g`` on both sides."""
    tool("qemu-img")
    m = mount(tmp_path / "m", {"g": case.table}, metadata_ttl=TTL)
    try:
        _interop(case, m, tmp_path)
    except BaseException:
        print(f"--- imagefs log ---\n{m.log_text()[-6000:]}")
        raise
    finally:
        unmount(m)


def _interop(case: Case, m: Mount, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    stores = {"g": case.glance}
    ours = {"ifs-small.raw": os.urandom(case.small), "ifs-large.raw": os.urandom(case.large)}
    for name, data in ours.items():
        (src / name).write_bytes(data)
        sh("cp", src / name, m.path("g", name))
    g_small, g_large = str(uuid.uuid4()), str(uuid.uuid4())
    (src / g_small).write_bytes(os.urandom(case.small))
    raw = src / "disk.raw"
    raw.write_bytes(os.urandom(-(-case.large // 512) * 512))  # disks are whole sectors
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, src / g_large)
    theirs = {g_small: (src / g_small).read_bytes(), g_large: (src / g_large).read_bytes()}

    xa = {n: {k: os.getxattr(m.path("g", n), k).decode() for k in os.listxattr(m.path("g", n))}
          for n in ours}
    for name, data in ours.items():
        assert xa[name]["user.imagefs.os_hash_value"] == hashlib.sha512(data).hexdigest()
        assert xa[name]["user.imagefs.checksum"] == hashlib.md5(data).hexdigest()
    if not case.imagefs_has_location:  # Glance has no form: no location, and it says so
        for name in ours:
            assert "user.imagefs.location" not in xa[name] and GLANCE_XATTR not in xa[name]
            r = imagefs_cli("location", m.path("g", name))
            assert r.returncode == 1 and "no location glance_store can parse" in r.stderr
    locs = {n: xa[n][GLANCE_XATTR] for n in ours if case.imagefs_has_location}

    # Glance adds its two; reads ours from the locations imagefs gives
    out = tmp_path / "out"
    out.mkdir()
    ops = [{"op": "add", "backend": "g", "id": i, "file": str(src / i), "algo": "sha512"}
           for i in (g_small, g_large)]
    ops += [{"op": "get", "backend": "g", "uri": loc, "out": str(out / n)}
            for n, loc in locs.items()]
    added_small, added_large, *got = glance(tmp_path, stores, ops)
    added = {g_small: ok(added_small), g_large: ok(added_large)}
    case.shapes(g_large, "ifs-large.raw")
    for name, res in zip(locs, got, strict=True):
        res = ok(res)
        data = ours[name]
        assert res["size"] == res["get_size"] == res["read"] == len(data), name
        assert (out / name).read_bytes() == data, f"{name}: Glance read other bytes"
        assert res["sha512"] == xa[name]["user.imagefs.os_hash_value"], name
        assert res["md5"] == xa[name]["user.imagefs.checksum"], name
        assert case.fields(name).items() <= res["fields"].items(), (name, res["fields"])
        assert xa[name]["user.imagefs.location"] == without_credentials(locs[name])

    # Glance's images through the mount: its bytes, its locations, qemu-img reads the qcow2
    wait_for(lambda: {g_small, g_large} <= set(os.listdir(m.path("g"))), "Glance's images")
    assert sorted(os.listdir(m.path("g"))) == sorted([*ours, g_small, g_large]), \
        "segments or snapshots show as images"
    for gid, data in theirs.items():
        p = m.path("g", gid)
        assert added[gid]["size"] == p.stat().st_size == len(data)
        assert p.read_bytes() == data
        assert os.getxattr(p, GLANCE_XATTR).decode() == added[gid]["location"]
        assert os.getxattr(p, "user.imagefs.location").decode() == \
            without_credentials(added[gid]["location"])
        r = imagefs_cli("location", "--glance", p)
        assert r.returncode == 0 and r.stdout.strip() == added[gid]["location"], r.stderr
    info = json.loads(sh("qemu-img", "info", "-f", "qcow2", "--output=json",
                         m.path("g", g_large)).stdout)
    assert info["virtual-size"] == raw.stat().st_size
    sh("qemu-img", "compare", "-f", "raw", "-F", "qcow2", raw, m.path("g", g_large))

    # metadata changes through the mount: Glance reads the same bytes, the hashes are its own
    os.chmod(m.path("g", g_small), 0o600)
    os.utime(m.path("g", g_large), (1_600_000_000, 1_600_000_000))
    for gid in (g_small, g_large):
        r = imagefs_cli("hash", m.path("g", gid))
        assert r.returncode == 0, r.stderr
        p = m.path("g", gid)
        assert os.getxattr(p, "user.imagefs.os_hash_value").decode() == added[gid]["multihash"]
        assert os.getxattr(p, "user.imagefs.checksum").decode() == added[gid]["checksum"]
    assert m.path("g", g_small).stat().st_mode & 0o777 == 0o600
    assert m.path("g", g_large).stat().st_mtime == 1_600_000_000

    # Glance reads its images again, deletes the small ones (its own, and ours if it can)
    ops = [{"op": "get", "backend": "g", "uri": added[gid]["location"], "out": str(out / gid)}
           for gid in (g_small, g_large)]
    ops.append({"op": "delete", "backend": "g", "uri": added[g_small]["location"]})
    if case.imagefs_has_location:
        ops.append({"op": "delete", "backend": "g", "uri": locs["ifs-small.raw"]})
    for res, gid in zip(glance(tmp_path, stores, ops), (g_small, g_large, None, None),
                        strict=False):
        res = ok(res)
        if gid is not None:
            assert res["sha512"] == added[gid]["multihash"], "metadata changes moved bytes"
            assert (out / gid).read_bytes() == theirs[gid]
    gone_by_glance = {g_small} | ({"ifs-small.raw"} if case.imagefs_has_location else set())
    wait_for(lambda: not gone_by_glance & set(os.listdir(m.path("g"))), "Glance's deletes")

    # imagefs deletes the rest: gone for Glance, and from the backend with segments/snapshots
    left = set(os.listdir(m.path("g")))
    for name in left:
        os.unlink(m.path("g", name))
    assert os.listdir(m.path("g")) == []
    ops = [{"op": "get", "backend": "g", "uri": added[g_large]["location"],
            "out": str(out / "x")}]
    if case.imagefs_has_location:
        ops.append({"op": "get", "backend": "g", "uri": locs["ifs-large.raw"],
                    "out": str(out / "y")})
    for res in glance(tmp_path, stores, ops):
        assert not res["ok"] and res["error"] == "NotFound", res
    assert case.backend_names() == []


# ------------------------------------------------------------------------------- the stores
def test_file(glance_available: None, file_store_table: dict[str, Any], tmp_path: Path) -> None:
    d = Path(file_store_table["path"])
    interop(Case(
        table=file_store_table,
        glance={"type": "file", "filesystem_store_datadir": str(d)},
        small=MiB + 1, large=3 * MiB + 5,
        backend_names=lambda: sorted(os.listdir(d)),
        fields=lambda name: {"path": str(d / name)}), tmp_path)


@pytest.mark.parametrize("glance_layout", [True, False], ids=["glance_layout", "plain"])
def test_rbd(glance_available: None, ceph: Any, rbd_store_table: dict[str, Any],
             tmp_path: Path, glance_layout: bool) -> None:
    """Without glance_layout imagefs's images have no snapshot, so no Glance location (and
    Glance cannot reach them); Glance's own images have theirs, and show it."""
    import rbd as librbd

    from tests.backends.fixtures import rados_connection

    table = {**rbd_store_table, "glance_layout": glance_layout}

    def names() -> list[str]:
        with rados_connection(ceph) as cluster, cluster.open_ioctx(table["pool"]) as io:
            return sorted(librbd.RBD().list(io))

    interop(Case(
        table=table,
        glance={"type": "rbd", "rbd_store_pool": table["pool"], "rbd_store_user": table["user"],
                "rbd_store_ceph_conf": table["conf"], "rbd_store_chunk_size": 4},
        small=MiB + 1, large=9 * MiB,
        backend_names=names,
        fields=lambda name: {"fsid": ceph.fsid, "pool": table["pool"], "image": name,
                             "snapshot": "snap"},
        imagefs_has_location=glance_layout), tmp_path)


@pytest.fixture(params=["swift", "rgw_swift"])
def swift_table(request: pytest.FixtureRequest) -> dict[str, Any]:
    """OpenStack Swift and RGW's Swift API, each in a fresh container."""
    return request.getfixturevalue(f"{request.param}_store_table")


def test_swift(glance_available: None, swift_table: dict[str, Any], tmp_path: Path) -> None:
    """Glance writes its large image as a DLO (1 MiB segments beside it), imagefs its own as
    an SLO (4 MiB segments in <container>_segments); locations are swift+config://ref1/...,
    Glance's single-tenant form, with glance-swift.conf holding the account."""
    table = {**swift_table, "glance_reference": "ref1"}
    key = Path(table["key_file"]).read_text().strip()
    container = table["container"]

    def names() -> list[str]:
        conn = swift_connection(table["auth_url"], table["user"], key)
        try:
            return sorted(o["name"] for c in (container, f"{container}_segments")
                          for o in conn.get_container(c, full_listing=True)[1])
        finally:
            conn.close()

    def shapes(glance_large: str, ours_large: str) -> None:
        conn = swift_connection(table["auth_url"], table["user"], key)
        try:
            h = conn.head_object(container, glance_large)
            assert h["x-object-manifest"] == f"{container}/{glance_large}-"  # a DLO
            segs = [o["name"] for o in conn.get_container(container,
                                                          prefix=glance_large + "-")[1]]
            assert segs == [f"{glance_large}-{i:05d}" for i in range(1, 7)], segs  # 1 MiB
            h = conn.head_object(container, ours_large)
            assert "true" in (h.get("x-static-large-object", "").lower(),  # an SLO
                              h.get("x-object-meta-static-large-object", "").lower())  # RGW
        finally:
            conn.close()

    interop(Case(
        table=table,
        glance={"type": "swift", "swift_store_container": container,
                "swift_store_create_container_on_put": True,
                "swift_store_large_object_size": 1, "swift_store_large_object_chunk_size": 1,
                "reference": {"user": table["user"], "key": key,
                              "auth_address": table["auth_url"], "auth_version": "1"}},
        small=300_000, large=5 * MiB + 512 * 1024,
        backend_names=names, shapes=shapes,
        fields=lambda name: {"container": container, "obj": name}), tmp_path)


def test_s3(glance_available: None, ceph: Any, s3_store_table: dict[str, Any],
            tmp_path: Path) -> None:
    """Above 5 MB both sides upload in parts; Glance takes its credentials only from the
    location, which imagefs gives root only."""
    table = s3_store_table
    host = ceph.s3_endpoint

    def names() -> list[str]:
        listing = s3_client(ceph).list_objects_v2(Bucket=table["bucket"])
        return sorted(o["Key"] for o in listing.get("Contents", []))

    def shapes(glance_large: str, ours_large: str) -> None:
        s3 = s3_client(ceph)
        for key in (glance_large, ours_large):  # multipart ETags end in -<parts>
            etag = s3.head_object(Bucket=table["bucket"], Key=key)["ETag"].strip('"')
            assert re.fullmatch(r"[0-9a-f]{32}-[0-9]+", etag), (key, etag)
        listing = s3.list_objects_v2(Bucket=table["bucket"])
        small = [o["ETag"].strip('"') for o in listing["Contents"] if o["Size"] < 5 * MiB]
        assert len(small) == 2 and all("-" not in e for e in small)  # single PUTs

    interop(Case(
        table=table,
        glance={"type": "s3", "s3_store_host": host, "s3_store_access_key": ceph.s3_access_key,
                "s3_store_secret_key": ceph.s3_secret_key, "s3_store_bucket": table["bucket"],
                "s3_store_bucket_url_format": "path", "s3_store_large_object_size": 5,
                "s3_store_large_object_chunk_size": 5},
        small=MiB + 1, large=12 * MiB + 3,
        backend_names=names, shapes=shapes,
        fields=lambda name: {"bucket": table["bucket"], "key": name}), tmp_path)


# ------------------------------------------------------------------------------- root only
def test_glance_location_is_root_only(ceph: Any, s3_store_table: dict[str, Any],
                                      tmp_path: Path) -> None:
    """The S3 location Glance needs holds the secret: only root (CAP_SYS_ADMIN) may read it,
    as ``trusted.imagefs.glance_location``. A real unprivileged user on an allow_other mount
    reads the credential-free location, and neither reads nor lists the trusted one."""
    tool("setpriv", "getfattr")
    where = Path(tempfile.mkdtemp(prefix="imagefs-nobody-"))  # /tmp: every user may enter it
    os.chmod(where, 0o755)
    m = mount(where / "m", {"s3": s3_store_table}, options=["allow_other"])
    try:
        (where / "m").chmod(0o755)
        img = m.path("s3", "vm.raw")
        img.write_bytes(os.urandom(MiB))
        secret = ceph.s3_secret_key
        as_root = os.getxattr(img, GLANCE_XATTR).decode()
        assert f"{ceph.s3_access_key}:{secret}@" in as_root
        public = os.getxattr(img, "user.imagefs.location").decode()
        assert public == without_credentials(as_root) and secret not in public
        assert GLANCE_XATTR.encode() in sh("getfattr", "-d", "-m", "-", img).stdout.encode()

        def nobody(*argv: str | Path) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup",
                                   "--clear-groups", "--inh-caps=-all", *map(str, argv)],
                                  capture_output=True, text=True, timeout=60)

        r = nobody("getfattr", "--only-values", "-n", "user.imagefs.location", img)
        assert r.returncode == 0 and r.stdout == public, r.stderr
        r = nobody("getfattr", "-n", GLANCE_XATTR, img)
        assert r.returncode != 0 and "No such attribute" in r.stderr, r.stdout + r.stderr
        r = nobody("getfattr", "-d", "-m", "-", img)
        assert r.returncode == 0 and "user.imagefs.location" in r.stdout, r.stderr
        assert GLANCE_XATTR not in r.stdout and secret not in r.stdout
        r = nobody(*IMAGEFS, "location", "--glance", img)
        assert r.returncode == 1 and "needs root" in r.stderr, r.stdout + r.stderr
        assert secret not in r.stdout + r.stderr
        r = nobody(*IMAGEFS, "location", img)
        assert r.returncode == 0 and r.stdout.strip() == public, r.stderr
        assert secret not in m.log_text()
    finally:
        unmount(m)
        shutil.rmtree(where, ignore_errors=True)
