"""The cinder store against the harness's real Cinder (RBD driver on the harness's Ceph).

cp/rsync/dd/qemu-img/fio through a mount already run on kind "cinder" in test_common.py; this
file covers what is Cinder's own: sizes that are not whole GiB, an image that outgrows its
volume while written, a volume made the way Glance makes one, crash leftovers, refusals (busy,
read-only), and what ``imagefs stores`` says. Everything is checked from outside imagefs: with
Cinder's REST API (the harness's helpers, not the store's code) and with librbd on the volume's
RBD image.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from imagefs import config as config_mod
from imagefs.stores import build
from imagefs.stores.base import Busy, Changed, Store
from tests.backends.cinder import CinderProject, api_call, api_get, wait_volume
from tests.integration.test_common import make_file, sh, sha256
from tests.kinds.cinder import cinder_table
from tests.mounting import IMAGEFS, Mount, kill_daemon_mid_write, unmount

MiB, GiB = 1 << 20, 1 << 30
CONNECTOR = {"host": "glance-test", "ip": "127.0.0.1", "platform": "x86_64", "os_type": "linux",
             "multipath": False, "mountpoint": "glance_store"}


# ------------------------------------------------------------------------------- helpers
def volumes(project: CinderProject) -> list[dict[str, Any]]:
    """Every volume of the project, as Cinder lists them (hidden ones too), being deleted or
    not."""
    return project.volumes()


def live(project: CinderProject) -> list[dict[str, Any]]:
    """Volumes not being deleted."""
    return [v for v in volumes(project) if v["status"] not in ("deleting", "error_deleting")]


def by_name(project: CinderProject, name: str) -> dict[str, Any]:
    (v,) = [v for v in live(project) if v["name"] == name]
    return v


def call(project: CinderProject, method: str, path: str, body: Any = None,
         version: str = "3.0") -> Any:
    status, data = api_call(method, project.url + path, project.token, body, version=version)
    assert status < 300, f"{method} {path}: HTTP {status} {data}"
    return data


def wait_gone(project: CinderProject, vid: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while any(v["id"] == vid for v in volumes(project)):
        assert time.monotonic() < deadline, f"volume {vid} not deleted"
        time.sleep(0.1)


@contextmanager
def attached(project: CinderProject, vid: str, mode: str = "rw") -> Iterator[dict[str, Any]]:
    """An attachment made as Glance's cinder driver makes one (create with a connector at
    3.54, complete at 3.44): yields the attachment; deleted afterwards."""
    att = call(project, "POST", "/attachments", {"attachment": {
        "volume_uuid": vid, "connector": CONNECTOR, "mode": mode}}, "3.54")["attachment"]
    call(project, "POST", f"/attachments/{att['id']}/action", {"os-complete": None}, "3.44")
    try:
        yield att
    finally:
        call(project, "DELETE", f"/attachments/{att['id']}", version="3.27")


@contextmanager
def rbd_image(project: CinderProject, att: dict[str, Any], read_only: bool = True
              ) -> Iterator[Any]:
    """The volume's RBD image, opened with librbd from the attachment's connection_info."""
    import rados
    import rbd

    info = project.info
    ci = att["connection_info"]
    assert ci["driver_volume_type"] == "rbd", ci
    pool, image = ci["name"].split("/")
    cluster = rados.Rados(conffile=info.ceph_conf, rados_id=info.ceph_user,
                          conf={"keyring": info.ceph_keyring})
    cluster.connect(timeout=30)
    try:
        with cluster.open_ioctx(pool) as ioctx, rbd.Image(ioctx, image,
                                                          read_only=read_only) as img:
            yield img
    finally:
        cluster.shutdown()


def open_store(table: dict[str, Any], tmp_path: Path, sid: str = "c") -> Store:
    """The store itself, built from the same table a mount would use, connected."""
    cfg = config_mod.parse({"stores": {sid: table}}, tmp_path / "direct.toml")
    store = build(cfg.stores[0])
    store.open()
    return store


def glance_volume(project: CinderProject, data: bytes, readonly: bool = True
                  ) -> tuple[str, str]:
    """A volume made the way glance_store's cinder driver makes one: ``image-<id>`` with
    ``glance_image_id``/``image_size``/``image_owner``, written through an rw attachment,
    detached, then marked read-only. Returns (image id, volume id)."""
    image_id = str(uuid.uuid4())
    gib = max(1, -(-len(data) // GiB))
    v = call(project, "POST", "/volumes", {"volume": {
        "size": gib, "name": f"image-{image_id}", "metadata": {
            "glance_image_id": image_id, "image_size": str(len(data)),
            "image_owner": project.project_id}}})["volume"]
    wait_volume(project.url, project.token, v["id"], "available")
    with attached(project, v["id"]) as att, rbd_image(project, att, read_only=False) as img:
        img.write(data, 0)
        img.flush()
    wait_volume(project.url, project.token, v["id"], "available")
    if readonly:
        call(project, "POST", f"/volumes/{v['id']}/action",
             {"os-update_readonly_flag": {"readonly": True}})
    return image_id, v["id"]


# ------------------------------------------------------------------------------- sizes
def test_sizes_that_are_not_whole_gib(mount_factory: Any, cinder_project: CinderProject,
                                      tmp_path: Path) -> None:
    """Volumes are whole GiB; the image is exactly its bytes (``image_size``), both ways."""
    m = mount_factory({"c": cinder_table(cinder_project)})
    src = tmp_path / "odd.raw"
    digest = make_file(src, 5 * MiB + 3, "odd")
    sh("cp", src, m.path("c", "odd.raw"))
    m.path("c", "one.raw").write_bytes(b"1")
    # just past 1 GiB, sparse: a truncate and a tail
    with open(m.path("c", "big.raw"), "wb") as f:
        f.truncate(GiB + 4097)
        f.seek(GiB + 4000)
        f.write(b"T" * 97)
    sizes = {n: os.stat(m.path("c", n)).st_size for n in os.listdir(m.path("c"))}
    assert sizes == {"odd.raw": 5 * MiB + 3, "one.raw": 1, "big.raw": GiB + 4097}
    assert sha256(m.path("c", "odd.raw")) == digest
    with open(m.path("c", "big.raw"), "rb") as f:
        f.seek(GiB + 3990)
        assert f.read() == bytes(10) + b"T" * 97  # and EOF at the exact size
    seen = {v["name"]: v for v in live(cinder_project)}
    assert {n: (seen[n]["size"], seen[n]["metadata"]["image_size"]) for n in sizes} == {
        "odd.raw": (1, str(5 * MiB + 3)), "one.raw": (1, "1"), "big.raw": (2, str(GiB + 4097))}
    # the volume's own bytes, through Cinder's attachment and librbd: the image, then zeros
    unmount(m)  # its read attachments go with it (one attachment at a time)
    with attached(cinder_project, seen["odd.raw"]["id"], "ro") as att, \
            rbd_image(cinder_project, att) as img:
        assert img.size() == GiB
        assert img.read(0, 5 * MiB + 3) == src.read_bytes()
        assert img.read(5 * MiB + 3, 4096) == bytes(4096)


def test_image_outgrows_its_volume_while_written(mount_factory: Any,
                                                 cinder_project: CinderProject) -> None:
    """Writes past the volume's end extend it while attached (3.42), to exactly the GiB the
    bytes need; writes straddling a GiB boundary land whole."""
    m = mount_factory({"c": cinder_table(cinder_project)})
    a, b, c = os.urandom(4 * MiB), os.urandom(4 * MiB), os.urandom(MiB)
    path = m.path("c", "grow.raw")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.pwrite(fd, a, 0)
        os.pwrite(fd, b, GiB - 2 * MiB)  # across the first boundary
        os.fsync(fd)  # writes are queued (write-behind): fsync waits for them
        sizes = []
        for v in live(cinder_project):
            if v["name"].startswith(".imagefs-") and v["attachments"]:
                sizes.append(v["size"])
        assert 2 in sizes, f"the upload volume was not extended while attached: {sizes}"
        os.pwrite(fd, c, 2 * GiB + 5)  # into the third GiB
    finally:
        os.close(fd)
    assert os.stat(path).st_size == 2 * GiB + 5 + MiB
    with open(path, "rb") as f:
        assert f.read(4 * MiB) == a
        f.seek(GiB - 2 * MiB)
        assert f.read(4 * MiB) == b
        f.seek(2 * GiB)
        assert f.read() == bytes(5) + c
    v = by_name(cinder_project, "grow.raw")
    assert v["size"] == 3 and v["metadata"]["image_size"] == str(2 * GiB + 5 + MiB)


# ------------------------------------------------------------------------------- Glance
def test_glance_made_volume_reads_through_imagefs(mount_factory: Any,
                                                  cinder_project: CinderProject,
                                                  tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 123)
    image_id, vid = glance_volume(cinder_project, data)
    # an upload Glance has not finished yet (attached, not read-only) is not shown
    gid = str(uuid.uuid4())
    pending_id = call(cinder_project, "POST", "/volumes", {"volume": {
        "size": 1, "name": f"image-{gid}",
        "metadata": {"glance_image_id": gid, "image_size": "10"}}})["volume"]["id"]
    wait_volume(cinder_project.url, cinder_project.token, pending_id, "available")
    m = mount_factory({"c": cinder_table(cinder_project)})
    with attached(cinder_project, pending_id):
        assert os.listdir(m.path("c")) == [image_id]
    path = m.path("c", image_id)
    assert os.stat(path).st_size == len(data)
    assert path.read_bytes() == data
    assert os.getxattr(path, "user.imagefs.location").decode() == f"cinder://c/{vid}"
    # Glance's read-only flag: metadata may change, the volume may not go
    os.chmod(path, 0o600)
    assert os.stat(path).st_mode & 0o777 == 0o600
    for attempt in (lambda: os.unlink(path), lambda: path.write_bytes(b"over"),
                    lambda: os.rename(path, m.path("c", "renamed.raw"))):
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EROFS
    assert "readonly-mode-update" in m.log_text()
    assert path.read_bytes() == data
    # cleared by the operator: now it may be deleted (and Cinder removes it)
    call(cinder_project, "POST", f"/volumes/{vid}/action",
         {"os-update_readonly_flag": {"readonly": False}})
    os.unlink(path)
    assert not any(v["id"] == vid for v in volumes(cinder_project)), "unlink returned early"


PROJECT = Path(__file__).resolve().parents[2]


def glance_store_side(project: CinderProject, workdir: Path, sid: str, **ops: Any
                      ) -> dict[str, Any]:
    """Run tests/glance_cinder_side.py as glance-api would run glance_store (see there):
    Debian's Python, a clean environment, the keyring in a private /etc/ceph."""
    if not Path("/usr/lib/python3/dist-packages/glance_store").is_dir():
        msg = "python3-glance-store is not installed (run tools/setup.sh)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    info = project.info
    workdir.mkdir(parents=True, exist_ok=True)
    etc = workdir / "etc-ceph"
    etc.mkdir(exist_ok=True)
    (etc / f"ceph.client.{info.ceph_user}.keyring").write_text(
        Path(info.ceph_keyring).read_text())
    req = workdir / "request.json"
    req.write_text(json.dumps({"workdir": str(workdir), "store": sid,
                               "endpoint": info.endpoint, "user_id": info.user_id,
                               "project_id": project.project_id, **ops}))
    script = f"mount --bind {etc} /etc/ceph && exec /usr/bin/python3 -I " \
             f"{PROJECT / 'tests' / 'glance_cinder_side.py'} {req}"
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=300, cwd=workdir,
                       env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(workdir),
                            "LANG": "C.UTF-8"})
    assert r.returncode == 0, f"glance_store failed:\n{r.stdout}\n{r.stderr[-6000:]}"
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


def test_glance_store_reads_imagefs_images_and_imagefs_reads_glances(
        cinder_project: CinderProject, mount_factory: Any, tmp_path: Path) -> None:
    """Both ways with glance_store 4.1's own cinder driver: it reads the image imagefs wrote
    from the location imagefs reports; imagefs shows the image it added, under its id."""
    m = mount_factory({"c": cinder_table(cinder_project)})
    src = tmp_path / "g.raw"
    digest = make_file(src, 3 * MiB + 77, "glance")
    sh("cp", src, m.path("c", "g.raw"))
    loc = os.getxattr(m.path("c", "g.raw"), "user.imagefs.location").decode()
    assert loc == f"cinder://c/{by_name(cinder_project, 'g.raw')['id']}"
    unmount(m)  # its attachment goes: Glance attaches the (not multiattach) volume itself
    image_id = str(uuid.uuid4())
    got = glance_store_side(cinder_project, tmp_path / "glance", "c", get=loc,
                            add={"id": image_id, "file": str(src)})
    assert got["get"] == {"size": 3 * MiB + 77, "bytes": 3 * MiB + 77, "sha256": digest,
                          "size_from_uri": 3 * MiB + 77}
    added = got["add"]
    assert added["size"] == 3 * MiB + 77
    m = mount_factory({"c": cinder_table(cinder_project)})
    assert sorted(os.listdir(m.path("c"))) == sorted(["g.raw", image_id])
    assert sha256(m.path("c", image_id)) == digest
    assert os.getxattr(m.path("c", image_id), "user.imagefs.location").decode() == \
        added["location"]
    v = by_name(cinder_project, f"image-{image_id}")
    assert v["metadata"]["readonly"] == "True" and v["metadata"]["image_size"] == str(3 * MiB + 77)


# ------------------------------------------------------------------------------- crashes
def test_killed_mid_upload_leaves_nothing_visible_and_next_mount_cleans(
        mount_factory: Any, cinder_project: CinderProject, tmp_path: Path) -> None:
    table = cinder_table(cinder_project)
    m = mount_factory({"c": table})
    m.path("c", "img.raw").write_bytes(b"published" * 1000)
    kill_daemon_mid_write(m, m.path("c", "new.raw"), hold=60)
    left = live(cinder_project)
    hidden = [v for v in left if v["name"].startswith(".imagefs-")]
    # the upload (attached), and maybe the next upload's volume made ahead
    assert any(v["attachments"] for v in hidden), left
    assert {v["name"] for v in left} - {v["name"] for v in hidden} == {"img.raw"}
    # nothing of the upload is visible meanwhile (a store that does not clean up yet)
    store = open_store(table, tmp_path)
    try:
        assert [i.name for i in store.list()] == ["img.raw"]
    finally:
        store.close()
    # the next mount removes the crashed process's volumes and attachments before it serves
    r = subprocess.run([*IMAGEFS, "mount", str(m.config), str(m.root), "-o", f"log={m.log}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    (img,) = live(cinder_project)
    assert img["name"] == "img.raw" and img["attachments"] == [], img
    assert os.listdir(m.path("c")) == ["img.raw"]
    assert m.path("c", "img.raw").read_bytes() == b"published" * 1000
    assert "removed attachment of a dead imagefs" in m.log_text()


def test_crashed_replace_is_finished_or_undone_at_mount(cinder_project: CinderProject,
                                                        tmp_path: Path) -> None:
    """A replace tags the old volume before renaming the new one in: a crash after the
    rename leaves the old one hidden (cleanup deletes it), before it only the tag (removed)."""
    from imagefs.stores.cinder.layout import REPLACED_KEY

    table = cinder_table(cinder_project)
    store = open_store(table, tmp_path)
    try:
        up = store.upload("a.raw", None)
        up.write(0, b"old")
        old = up.commit({})
        up = store.upload("b.raw", None)
        up.write(0, b"new")
        new = up.commit({})
        # crash after the rename: both named a.raw, the old one tagged
        call(cinder_project, "POST", f"/volumes/{old.version}/metadata",
             {"metadata": {REPLACED_KEY: new.version}})
        call(cinder_project, "PUT", f"/volumes/{new.version}", {"volume": {"name": "a.raw"}})
        assert [i.name for i in store.list()] == ["a.raw"]
        assert store.stat("a.raw").version == new.version
        # crash before the rename: c.raw tagged as replaced by a volume named otherwise
        up = store.upload("c.raw", None)
        up.write(0, b"ccc")
        c = up.commit({})
        call(cinder_project, "POST", f"/volumes/{c.version}/metadata",
             {"metadata": {REPLACED_KEY: new.version}})
        assert store.stat("c.raw").version == c.version
        assert store.cleanup_leftovers() == 2
        wait_gone(cinder_project, old.version)
        assert REPLACED_KEY not in by_name(cinder_project, "c.raw")["metadata"]
        assert store.read_range("a.raw", new.version, 0, 10) == b"new"
    finally:
        store.close()


# ------------------------------------------------------------------------------- refusals
def test_in_use_volume_is_busy_and_delete_waits_until_gone(
        mount_factory: Any, cinder_project: CinderProject, tmp_path: Path) -> None:
    m = mount_factory({"c": cinder_table(cinder_project, detach_after=0.5)})
    m.path("c", "vm.raw").write_bytes(b"v" * 100000)
    assert m.path("c", "vm.raw").read_bytes() == b"v" * 100000
    v = by_name(cinder_project, "vm.raw")
    deadline = time.monotonic() + 20  # imagefs detaches its own read attachment when idle
    while api_get(f"{cinder_project.url}/volumes/{v['id']}", cinder_project.token
                  )["volume"]["attachments"]:
        assert time.monotonic() < deadline, "idle read attachment never detached"
        time.sleep(0.2)
    with attached(cinder_project, v["id"]):  # a VM, say
        for attempt in (lambda: os.unlink(m.path("c", "vm.raw")),
                        lambda: m.path("c", "vm.raw").write_bytes(b"other")):
            with pytest.raises(OSError) as e:
                attempt()
            assert e.value.errno == errno.EBUSY
        # one attachment at a time (not multiattach): a reader without cached bytes is busy,
        # unless it knows the RBD pool: then it reads without an attachment
        table = {k: val for k, val in cinder_table(cinder_project).items() if k != "rbd_pool"}
        store = open_store(table, tmp_path)
        try:
            with pytest.raises(Busy):
                store.read_range("vm.raw", v["id"], 0, 10)
        finally:
            store.close()
        store = open_store(cinder_table(cinder_project), tmp_path)
        try:
            assert store.read_range("vm.raw", v["id"], 0, 10) == b"v" * 10
        finally:
            store.close()
    assert m.path("c", "vm.raw").read_bytes() == b"v" * 100000
    os.unlink(m.path("c", "vm.raw"))
    assert not any(x["id"] == v["id"] for x in volumes(cinder_project))


def test_multiattach_type_lets_two_mounts_read_at_once(
        cinder_project: CinderProject, mount_factory: Any, tmp_path: Path) -> None:
    """Two imagefs processes (two hosts, as Cinder sees them) reading one image at once need
    a multiattach volume type; the harness's Cinder has one."""
    table = cinder_table(cinder_project, volume_type=cinder_project.info.multiattach_type)
    one, two = mount_factory({"c": table}), mount_factory({"c": table})
    src = tmp_path / "shared.raw"
    digest = make_file(src, 6 * MiB + 1, "shared")
    sh("cp", src, one.path("c", "shared.raw"))
    assert sha256(one.path("c", "shared.raw")) == digest  # one's attachment stays a while
    assert sha256(two.path("c", "shared.raw")) == digest
    v = by_name(cinder_project, "shared.raw")
    assert v["multiattach"] and len(v["attachments"]) == 2, v["attachments"]


def test_read_of_a_volume_deleted_elsewhere_is_changed(cinder_project: CinderProject,
                                                       tmp_path: Path) -> None:
    store = open_store(cinder_table(cinder_project, detach_after=0.0), tmp_path)
    try:
        up = store.upload("p.raw", None)
        up.write(0, b"1" * MiB)
        v1 = up.commit({})
        store.readers.drop(v1.version)  # no handle left: the next read attaches again
        call(cinder_project, "DELETE", f"/volumes/{v1.version}")
        wait_gone(cinder_project, v1.version)
        with pytest.raises(Changed):
            store.read_range("p.raw", v1.version, 0, 10)
    finally:
        store.close()


def test_read_without_attachment_stops_when_the_volume_goes(cinder_project: CinderProject,
                                                             tmp_path: Path) -> None:
    """A volume attached elsewhere is read without an attachment (rbd_pool known): nothing
    keeps it from being deleted then, and librbd would read zeros; the read after it is EIO."""
    store = open_store(cinder_table(cinder_project), tmp_path)
    try:
        up = store.upload("e.raw", None)
        up.write(0, b"e" * MiB)
        v = up.commit({})
        store.readers.drop(v.version)
        with attached(cinder_project, v.version) as att:  # someone else's
            assert store.read_range("e.raw", v.version, 0, 10) == b"e" * 10
            aid = att["id"]
        assert aid not in {a["attachment_id"] for a in by_name(cinder_project,
                                                                 "e.raw")["attachments"]}
        call(cinder_project, "DELETE", f"/volumes/{v.version}")
        wait_gone(cinder_project, v.version)
        with pytest.raises(Changed):
            store.read_range("e.raw", v.version, 0, 10)
    finally:
        store.close()


def test_names_cinder_would_strip_are_kept_exactly(mount_factory: Any,
                                                  cinder_project: CinderProject) -> None:
    """Cinder strips white space at both ends of a volume name: the exact name is kept."""
    m = mount_factory({"c": cinder_table(cinder_project)})
    m.path("c", " padded.raw ").write_bytes(b"p")
    m.path("c", "padded.raw").write_bytes(b"q")  # what Cinder would make of the first
    assert sorted(os.listdir(m.path("c"))) == [" padded.raw ", "padded.raw"]
    assert m.path("c", " padded.raw ").read_bytes() == b"p"
    assert sorted(v["name"] for v in live(cinder_project)
                  if not v["name"].startswith(".")) == ["padded.raw", "padded.raw"]
    os.rename(m.path("c", " padded.raw "), m.path("c", "plain.raw"))
    os.rename(m.path("c", "padded.raw"), m.path("c", "\tpadded.raw"))
    assert sorted(os.listdir(m.path("c"))) == ["\tpadded.raw", "plain.raw"]
    assert m.path("c", "plain.raw").read_bytes() == b"p"
    assert m.path("c", "\tpadded.raw").read_bytes() == b"q"
    assert "imagefs-name" not in by_name(cinder_project, "plain.raw")["metadata"]


# ------------------------------------------------------------------------------- discovery
def test_stores_command_shows_type_and_properties_and_no_secrets(
        mount_factory: Any, cinder_project: CinderProject, tmp_path: Path) -> None:
    m: Mount = mount_factory({"c": cinder_table(cinder_project)})
    m.path("c", "x.raw").write_bytes(b"x" * 12345)
    r = subprocess.run([*IMAGEFS, "stores", str(m.config), "--json"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)["stores"]
    assert row["type"] == "cinder"
    props = row["properties"]
    assert props["project_id"] == cinder_project.project_id and props["auth"] == "noauth"
    assert (props["images"], props["bytes"]) == (1, 12345)
    key = [ln.split("=", 1)[1].strip() for ln in
           Path(cinder_project.info.ceph_keyring).read_text().splitlines()
           if ln.strip().startswith("key")]
    assert not any(k in r.stdout for k in key)


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    base = {"type": "cinder", "ceph_conf": "/etc/ceph/ceph.conf"}
    cases = (({**base, "auth": "noauth", "user_id": "u", "project_id": "p"}, "endpoint"),
             ({**base, "auth_url": "http://k:5000/v3", "user": "u", "project": "p"},
              "password_file"),
             ({**base, "user": "u"}, "auth_url"),
             ({"type": "cinder", "auth": "noauth", "endpoint": "http://c/v3", "user_id": "u",
               "project_id": "p"}, "ceph_conf"),
             ({**base, "auth": "noauth", "endpoint": "http://c/v3", "user_id": "u",
               "project_id": "p", "match_metadata": ["novalue"]}, "match_metadata"))
    for table, key in cases:
        with pytest.raises(config_mod.ConfigError) as e:
            config_mod.parse({"stores": {"c": table}}, tmp_path / "c.toml")
        assert f"stores.c.{key}" in str(e.value)
