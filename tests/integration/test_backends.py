"""The real backends work end to end with the client libraries imagefs uses for them.

These test the harness (tests/backends), not imagefs: when one fails, the backend or its
fixture is broken, and imagefs's own integration tests cannot be trusted either. Data is
random and compared byte for byte; statuses alone prove little.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.backends import common
from tests.backends.ceph import CephInfo
from tests.backends.cinder import CinderProject, api_call, wait_volume
from tests.backends.common import Backend, BackendError, BackendMissing
from tests.backends.fixtures import (
    BackendManager,
    rados_connection,
    s3_client,
    swift_connection,
    unavailable,
    unique_name,
)
from tests.backends.nginx import NginxInfo
from tests.backends.swift import SwiftInfo

MiB = 1 << 20
PROJECT = Path(__file__).resolve().parents[2]


# --- Ceph: librados, librbd ------------------------------------------------------------------


def test_librados_write_read_stat(ceph: CephInfo, rbd_pool: str) -> None:
    data = os.urandom(3 * MiB + 17)
    with rados_connection(ceph) as cluster, cluster.open_ioctx(rbd_pool) as ioctx:
        ioctx.write_full("obj", data)
        assert ioctx.read("obj", len(data) + 1) == data
        assert ioctx.read("obj", 100, MiB - 50) == data[MiB - 50 : MiB + 50]
        size, _mtime = ioctx.stat("obj")
        assert size == len(data)
        assert cluster.get_fsid() == ceph.fsid


def write_read_rbd_image(info: CephInfo, pool: str, data: bytes, offset: int) -> bytes:
    """Create a 64 MiB image, write *data* at *offset*, return what reads back there."""
    import rbd

    with rados_connection(info) as cluster, cluster.open_ioctx(pool) as ioctx:
        rbd.RBD().create(ioctx, "disk", 64 * MiB, order=22)  # 4 MiB objects
        with rbd.Image(ioctx, "disk") as image:
            assert image.write(data, offset) == len(data)
            image.flush()
            assert image.size() == 64 * MiB
            assert image.read(0, 4096) == bytes(4096)  # never written: zeros
            return image.read(offset, len(data))


def test_librbd_write_across_object_boundary(ceph: CephInfo, rbd_pool: str) -> None:
    data = os.urandom(MiB)
    assert write_read_rbd_image(ceph, rbd_pool, data, 4 * MiB - MiB // 2) == data


def test_two_ceph_clusters_at_once(
    ceph: CephInfo, ceph2: CephInfo, rbd_pool: str, rbd_pool2: str
) -> None:
    assert ceph.fsid != ceph2.fsid
    assert ceph.conf != ceph2.conf
    assert ceph2.s3_endpoint is None
    one, two = os.urandom(MiB), os.urandom(MiB)
    assert write_read_rbd_image(ceph, rbd_pool, one, 8 * MiB) == one
    assert write_read_rbd_image(ceph2, rbd_pool2, two, 8 * MiB) == two
    for info, pool, other_pool in ((ceph, rbd_pool, rbd_pool2), (ceph2, rbd_pool2, rbd_pool)):
        with rados_connection(info) as cluster:
            assert cluster.get_fsid() == info.fsid
            assert cluster.pool_exists(pool) and not cluster.pool_exists(other_pool)


# --- Ceph RGW: S3 and Swift APIs -------------------------------------------------------------


def test_rgw_s3_put_get_ranged(ceph: CephInfo, s3_bucket: str) -> None:
    s3 = s3_client(ceph)
    data = os.urandom(2 * MiB + 5)
    s3.put_object(Bucket=s3_bucket, Key="dir/a.img", Body=data)
    assert s3.get_object(Bucket=s3_bucket, Key="dir/a.img")["Body"].read() == data
    got = s3.get_object(Bucket=s3_bucket, Key="dir/a.img", Range="bytes=1000-2999")
    assert got["ContentRange"] == f"bytes 1000-2999/{len(data)}"
    assert got["Body"].read() == data[1000:3000]
    assert s3.head_object(Bucket=s3_bucket, Key="dir/a.img")["ContentLength"] == len(data)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == ["dir/a.img"]


def test_rgw_s3_multipart_upload(ceph: CephInfo, s3_bucket: str) -> None:
    s3 = s3_client(ceph)
    parts = [os.urandom(5 * MiB), os.urandom(MiB + 3)]  # 5 MiB: S3's minimum non-last part
    up = s3.create_multipart_upload(Bucket=s3_bucket, Key="big.img")
    done = []
    for n, body in enumerate(parts, 1):
        r = s3.upload_part(
            Bucket=s3_bucket, Key="big.img", UploadId=up["UploadId"], PartNumber=n, Body=body
        )
        done.append({"PartNumber": n, "ETag": r["ETag"]})
    s3.complete_multipart_upload(
        Bucket=s3_bucket, Key="big.img", UploadId=up["UploadId"], MultipartUpload={"Parts": done}
    )
    whole = b"".join(parts)
    head = s3.head_object(Bucket=s3_bucket, Key="big.img")
    assert head["ContentLength"] == len(whole) and head["ETag"].strip('"').endswith("-2")
    assert s3.get_object(Bucket=s3_bucket, Key="big.img")["Body"].read() == whole
    b = len(parts[0])
    got = s3.get_object(Bucket=s3_bucket, Key="big.img", Range=f"bytes={b - 10}-{b + 9}")
    assert got["Body"].read() == whole[b - 10 : b + 10]


def test_s3_bucket_cleanup_aborts_uploads(ceph: CephInfo) -> None:
    """What the s3_bucket fixture's teardown does, checked: nothing may survive it."""
    from tests.backends.fixtures import empty_and_delete_bucket

    s3 = s3_client(ceph)
    bucket = unique_name("t-")
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="x", Body=b"x")
    s3.create_multipart_upload(Bucket=bucket, Key="pending")
    empty_and_delete_bucket(s3, bucket)
    names = [b["Name"] for b in s3.list_buckets()["Buckets"]]
    assert bucket not in names


def test_rgw_swift_api(ceph: CephInfo, rgw_swift_container: str) -> None:
    conn = swift_connection(
        str(ceph.rgw_swift_auth_url), str(ceph.rgw_swift_user), str(ceph.rgw_swift_key)
    )
    data = os.urandom(MiB + 1)
    conn.put_container(rgw_swift_container)
    etag = conn.put_object(rgw_swift_container, "vm.img", data)
    assert etag == hashlib.md5(data).hexdigest()
    assert conn.get_object(rgw_swift_container, "vm.img")[1] == data
    headers, part = conn.get_object(
        rgw_swift_container, "vm.img", headers={"Range": "bytes=100-199"}
    )
    assert part == data[100:200]
    _, listing = conn.get_container(rgw_swift_container)
    assert [(o["name"], o["bytes"]) for o in listing] == [("vm.img", len(data))]


# --- Swift -----------------------------------------------------------------------------------


def test_swift_slo_ranged_get_across_segments(swift: SwiftInfo, swift_container: str) -> None:
    conn = swift_connection(swift.auth_url, swift.user, swift.key)
    segments = f"{swift_container}_segments"
    conn.put_container(swift_container)
    conn.put_container(segments)
    chunks = [os.urandom(MiB), os.urandom(MiB // 2 + 7)]
    manifest = []
    for i, chunk in enumerate(chunks):
        etag = conn.put_object(segments, f"vm.img/{i:03d}", chunk)
        manifest.append(
            {"path": f"/{segments}/vm.img/{i:03d}", "etag": etag, "size_bytes": len(chunk)}
        )
    conn.put_object(
        swift_container, "vm.img", json.dumps(manifest), query_string="multipart-manifest=put"
    )
    whole = b"".join(chunks)
    head = conn.head_object(swift_container, "vm.img")
    assert head["x-static-large-object"] == "True"
    assert int(head["content-length"]) == len(whole)
    assert conn.get_object(swift_container, "vm.img")[1] == whole
    b = len(chunks[0])
    resp: dict[str, Any] = {}
    headers, part = conn.get_object(
        swift_container, "vm.img", headers={"Range": f"bytes={b - 5}-{b + 4}"}, response_dict=resp
    )
    assert resp["status"] == 206
    assert headers["content-range"] == f"bytes {b - 5}-{b + 4}/{len(whole)}"
    assert part == whole[b - 5 : b + 5]


def test_swift_plain_object_and_metadata(swift: SwiftInfo, swift_container: str) -> None:
    conn = swift_connection(swift.auth_url, swift.user, swift.key)
    conn.put_container(swift_container)
    data = os.urandom(100_000)
    # ~3 KiB of metadata: more than ext4 leaves for xattrs, so this checks the storage choice
    meta = {f"X-Object-Meta-K{i}": "v" * 200 for i in range(15)}
    conn.put_object(swift_container, "a", data, headers=meta)
    headers, body = conn.get_object(swift_container, "a")
    assert body == data
    assert headers["x-object-meta-k14"] == "v" * 200


# --- nginx -----------------------------------------------------------------------------------


def test_nginx_range_and_json_autoindex(nginx: NginxInfo) -> None:
    name = unique_name() + ".img"
    data = os.urandom(MiB)
    (nginx.root / "sub").mkdir(exist_ok=True)
    (nginx.root / "sub" / name).write_bytes(data)
    req = urllib.request.Request(f"{nginx.url}sub/{name}", headers={"Range": "bytes=10-1033"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes 10-1033/{len(data)}"
        assert resp.read() == data[10:1034]
    with urllib.request.urlopen(f"{nginx.url}sub/", timeout=10) as resp:
        listing = json.loads(resp.read())
    assert {"name": name, "type": "file", "size": len(data)}.items() <= next(
        e for e in listing if e["name"] == name
    ).items()
    with urllib.request.urlopen(nginx.url, timeout=10) as resp:
        assert {"name": "sub", "type": "directory"}.items() <= json.loads(resp.read())[0].items()


# --- Cinder ----------------------------------------------------------------------------------


def test_cinder_volume_attach_rbd_io_extend_delete(cinder_project: CinderProject) -> None:
    """Cinder's chain end to end (API, scheduler, volume service, RBD driver), as the store
    uses it: an attachment's connection_info names an RBD image our librbd writes and reads."""
    import rados
    import rbd

    url, token, info = cinder_project.url, cinder_project.token, cinder_project.info
    status, body = api_call("POST", f"{url}/volumes", token, {"volume": {"size": 1, "name": "t"}})
    assert status == 202, body
    vid = body["volume"]["id"]
    wait_volume(url, token, vid, "available")
    conn = {"host": "harness-test", "ip": "127.0.0.1", "platform": "x86_64",
            "os_type": "linux", "multipath": False}
    status, att = api_call("POST", f"{url}/attachments", token, {"attachment": {
        "volume_uuid": vid, "connector": conn, "mode": "rw"}}, version="3.54")
    assert status == 200, att
    ci = att["attachment"]["connection_info"]
    assert ci["driver_volume_type"] == "rbd" and ci["name"] == f"{info.pool}/volume-{vid}"
    aid = att["attachment"]["id"]
    assert api_call("POST", f"{url}/attachments/{aid}/action", token, {"os-complete": None},
                    version="3.44")[0] == 204
    data = os.urandom(MiB)
    cluster = rados.Rados(conffile=info.ceph_conf, rados_id=info.ceph_user,
                          conf={"keyring": info.ceph_keyring})
    cluster.connect(timeout=30)
    try:
        with cluster.open_ioctx(info.pool) as ioctx, rbd.Image(ioctx, f"volume-{vid}") as img:
            img.write(data, (1 << 30) - MiB)  # up to the volume's end
            assert api_call("POST", f"{url}/volumes/{vid}/action", token,
                            {"os-extend": {"new_size": 2}}, version="3.42")[0] == 202
            wait_volume(url, token, vid, "in-use")  # extended while attached
            assert img.size() == 2 << 30
            img.write(data, (1 << 30) - MiB // 2)  # across the old end
            assert img.read((1 << 30) - MiB // 2, MiB) == data
    finally:
        cluster.shutdown()
    assert api_call("DELETE", f"{url}/attachments/{aid}", token, version="3.27")[0] == 200
    wait_volume(url, token, vid, "available")
    assert api_call("DELETE", f"{url}/volumes/{vid}", token)[0] == 202


# --- the harness itself ----------------------------------------------------------------------


def test_cli_up_env_down(nginx: NginxInfo, tmp_path: Path) -> None:
    """``up --detach``/``env``/``down`` by hand (nginx only: quick; needing the ``nginx``
    fixture gives this test the same skip-or-fail policy)."""
    root = tmp_path / "set"
    env = dict(os.environ, PYTHONPATH=str(PROJECT))
    env.pop("IMAGEFS_USE_BACKENDS", None)

    def cli(*args: str) -> str:
        res = subprocess.run(
            [sys.executable, "-m", "tests.backends", *args, "--dir", str(root)],
            cwd=PROJECT, env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        return res.stdout

    cli("up", "--only", "nginx", "--detach")
    try:
        exports = dict(
            line.removeprefix("export ").split("=", 1) for line in cli("env").splitlines()
        )
        url = exports["NGINX_URL"]
        Path(exports["NGINX_ROOT"], "f").write_bytes(b"hello")
        assert common.http_status(url + "f") == 200
        state = json.loads((root / "state.json").read_text())
        pids = state["backends"]["nginx"]["pids"]
    finally:
        cli("down")
    assert common.http_status(url + "f") is None
    assert not any(common.pid_alive(p) for p in pids)
    assert not root.exists()


class _Broken(Backend):
    name = "ceph"
    packages = "nothing"
    starts = 0

    def _start(self) -> None:
        type(self).starts += 1
        raise BackendError("simulated failure")


def test_failed_start_is_cached_and_skips(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A broken backend is tried once; without CI its tests skip with an install hint."""
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("IMAGEFS_USE_BACKENDS", raising=False)
    monkeypatch.setattr("tests.backends.fixtures.make", lambda name, root: _Broken(root / name))
    manager = BackendManager(SimpleNamespace())  # type: ignore[arg-type]
    request = SimpleNamespace(session=SimpleNamespace(items=[]))
    try:
        for _ in range(2):
            with pytest.raises(pytest.skip.Exception, match="apt-get install"):
                manager.get("ceph", request)  # type: ignore[arg-type]
        assert _Broken.starts == 1
    finally:
        manager._pool.shutdown()
        if manager.root is not None:
            common.remove_tree(manager.root)


def test_unavailable_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """With CI set a missing backend is a failure carrying the reason, never a skip."""
    error = BackendMissing("missing memcached: install with `apt-get install memcached`")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set.*\n.*missing memcached"):
        unavailable("swift", error)
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="apt-get install memcached"):
        unavailable("swift", error)
    with pytest.raises(pytest.skip.Exception, match="apt-get install swift swift-proxy"):
        unavailable("swift", BackendError("proxy exited with status 1"))
