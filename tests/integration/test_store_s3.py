"""S3 store against the harness's RGW: what the common store tests do not cover (issue 4).

Two S3 stores side by side, server-side rename (single and multipart copy), replace-while-open,
a multi-GiB streamed upload with the daemon's memory watched, crash leftovers, foreign objects,
and a frozen endpoint ending in EIO rather than a hang.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.backends.fixtures import empty_and_delete_bucket, s3_client, unique_name
from tests.integration.test_common import MiB, make_file, sh
from tests.kinds.s3 import s3_table
from tests.mounting import IMAGEFS, daemon_pid, unmount


def _hidden_state(s3: Any, bucket: str) -> tuple[list[str], list[str]]:
    """(keys of multipart uploads in progress, keys of hidden objects) in ``bucket``."""
    ups = [u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
    objs = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])
            if o["Key"].startswith(".imagefs-")]
    return ups, objs


@pytest.fixture
def second_bucket(ceph: Any) -> Iterator[str]:
    s3 = s3_client(ceph)
    bucket = unique_name("t2-")
    s3.create_bucket(Bucket=bucket)
    yield bucket
    empty_and_delete_bucket(s3, bucket)


def test_two_s3_stores_and_file_store_copies(mount_factory: Any, ceph: Any, s3_bucket: str,
                                             second_bucket: str, local_store_table: Any,
                                             tmp_path: Path) -> None:
    """Two buckets (one under a prefix) in one mount; copies S3 → S3 → file → S3 keep bytes."""
    a = s3_table(ceph, s3_bucket, tmp_path)
    b = s3_table(ceph, second_bucket, tmp_path, prefix="glance/images/")
    m = mount_factory({"a": a, "b": b, "local": local_store_table})
    src = tmp_path / "vm.raw"
    digest = make_file(src, 13 * MiB + 5, "two")
    sh("cp", src, m.path("a", "vm.raw"))
    sh("cp", m.path("a", "vm.raw"), m.path("b", "vm.raw"))
    sh("cp", m.path("b", "vm.raw"), m.path("local", "vm.raw"))
    sh("cp", m.path("local", "vm.raw"), m.path("a", "back.raw"))
    for p in (m.path("b", "vm.raw"), m.path("local", "vm.raw"), m.path("a", "back.raw")):
        assert sh("sha256sum", p).stdout.split()[0] == digest
    s3 = s3_client(ceph)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=second_bucket)["Contents"]]
    assert keys == ["glance/images/vm.raw"]
    assert sorted(os.listdir(m.path("a"))) == ["back.raw", "vm.raw"]
    assert os.listdir(m.path("b")) == ["vm.raw"]
    # glance_store takes the last two parts of an s3 location for bucket and key: a key under
    # "glance/images/" has no Glance form, so no location; without a prefix, Glance's own
    assert "user.imagefs.location" not in os.listxattr(m.path("b", "vm.raw"))
    loc = os.getxattr(m.path("a", "vm.raw"), "user.imagefs.location").decode()
    assert loc == f"s3://{ceph.s3_endpoint.split('://')[1]}/{s3_bucket}/vm.raw"
    assert a["secret_access_key_file"] not in m.log_text()
    assert ceph.s3_secret_key not in m.log_text()


def test_metadata_change_in_the_same_second_shows_in_listings(
        mount_factory: Any, ceph: Any, s3_bucket: str, tmp_path: Path) -> None:
    """A metadata copy keeps the ETag and, within the second, LastModified: a listing must
    not keep serving what it HEADed before the change."""
    m = mount_factory({"s": s3_table(ceph, s3_bucket, tmp_path)}, metadata_ttl=0.5)
    for i in range(3):
        p = m.path("s", f"m{i}.raw")
        p.write_bytes(b"m" * 1000)
        os.listdir(m.path("s"))  # a listing HEADs it
        os.chmod(p, 0o600)
        time.sleep(1.0)  # past the metadata TTL
        listed = {e.name: e.stat().st_mode & 0o777 for e in os.scandir(m.path("s"))}
        assert listed[f"m{i}.raw"] == 0o600, listed


@pytest.mark.parametrize("threshold", ["5GiB", "5MiB"], ids=["copy", "multipart-copy"])
def test_rename_is_server_side_copy(mount_factory: Any, ceph: Any, s3_bucket: str,
                                    tmp_path: Path, threshold: str) -> None:
    """Rename keeps bytes, mtime, mode and hashes; the source goes, no hidden key remains."""
    m = mount_factory({"s": s3_table(ceph, s3_bucket, tmp_path,
                                     multipart_copy_threshold=threshold)})
    src = tmp_path / "a.raw"
    digest = make_file(src, 12 * MiB + 3, "ren")
    sh("cp", src, m.path("s", "a.raw"))
    os.chmod(m.path("s", "a.raw"), 0o600)
    os.utime(m.path("s", "a.raw"), (1_600_000_000, 1_600_000_000))
    hashes = os.getxattr(m.path("s", "a.raw"), "user.imagefs.os_hash_value")
    os.rename(m.path("s", "a.raw"), m.path("s", "b.raw"))
    st = os.stat(m.path("s", "b.raw"))
    assert st.st_mtime == 1_600_000_000 and st.st_mode & 0o777 == 0o600
    assert os.getxattr(m.path("s", "b.raw"), "user.imagefs.os_hash_value") == hashes
    assert os.listdir(m.path("s")) == ["b.raw"]
    s3 = s3_client(ceph)
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]] == ["b.raw"]
    assert _hidden_state(s3, s3_bucket) == ([], [])
    head = s3.head_object(Bucket=s3_bucket, Key="b.raw")
    assert head["Metadata"]["mtime"].startswith("1600000000")
    assert hashlib.sha256(s3.get_object(Bucket=s3_bucket, Key="b.raw")["Body"].read()
                          ).hexdigest() == digest


def test_replaced_while_open_never_mixes(mount_factory: Any, ceph: Any, s3_bucket: str,
                                         tmp_path: Path) -> None:
    m = mount_factory({"s": s3_table(ceph, s3_bucket, tmp_path)},
                      cache={"readahead": "1MiB", "memory_size": "8MiB", "disk_size": "0"})
    src = tmp_path / "a.raw"
    make_file(src, 48 * MiB, "old")
    old = src.read_bytes()
    sh("cp", src, m.path("s", "a.raw"))
    with open(m.path("s", "a.raw"), "rb", buffering=0) as f:
        assert f.read(65536) == old[:65536]
        make_file(tmp_path / "new.raw", 48 * MiB, "new")
        new = (tmp_path / "new.raw").read_bytes()
        s3_client(ceph).put_object(Bucket=s3_bucket, Key="a.raw", Body=new)
        try:
            f.seek(40 * MiB)
            rest = f.read(MiB)
        except OSError as e:
            assert e.errno == errno.EIO
        else:
            assert rest == old[40 * MiB:41 * MiB], "bytes of the replacement mixed into a reader"
    assert "changed since it was opened" in m.log_text()
    # a new open sees the new object
    with open(m.path("s", "a.raw"), "rb") as f:
        f.seek(40 * MiB)
        assert f.read(MiB) == new[40 * MiB:41 * MiB]


def _pattern_writer(size: int) -> str:
    """A program printing ``size`` bytes of non-repeating data to stdout, then its sha256 to
    stderr: the image never exists on local disk."""
    return (
        "import hashlib,sys\n"
        f"size={size}; h=hashlib.sha256(); out=sys.stdout.buffer; base=bytearray(4<<20)\n"
        "for i in range(0, len(base), 64): base[i:i+64]=hashlib.sha512(str(i).encode()).digest()\n"
        "for off in range(0, size, 4<<20):\n"
        "    blk = bytearray(base[:min(4<<20, size-off)]); blk[:16]=off.to_bytes(16,'big')\n"
        "    h.update(blk); out.write(blk)\n"
        "out.flush(); print(h.hexdigest(), file=sys.stderr)\n")


def _hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_multi_gib_streamed_upload_bounded_memory(mount_factory: Any, ceph: Any,
                                                  s3_bucket: str, tmp_path: Path) -> None:
    """2 GiB through ``dd`` as one multipart upload with disk-buffered parts (upload_memory
    below two parts), read back through the mount; the daemon's peak RSS stays far below it."""
    size = 2048 * MiB + 12345
    table = s3_table(ceph, s3_bucket, tmp_path, part_size="16MiB", upload_memory="32MiB",
                     multipart_copy_threshold="512MiB")
    m = mount_factory({"s": table}, cache={"memory_size": "32MiB", "disk_size": "64MiB"})
    pid = daemon_pid(m)
    gen = subprocess.Popen([sys.executable, "-c", _pattern_writer(size)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    dd = subprocess.run(["dd", f"of={m.path('s', 'big.raw')}", "bs=4M", "iflag=fullblock",
                         "status=none"], stdin=gen.stdout, capture_output=True, timeout=900)
    assert gen.stdout is not None and gen.stderr is not None
    gen.stdout.close()
    digest = gen.stderr.read().decode().strip()
    assert gen.wait() == 0 and dd.returncode == 0, dd.stderr
    assert os.stat(m.path("s", "big.raw")).st_size == size
    assert sh("sha256sum", m.path("s", "big.raw")).stdout.split()[0] == digest
    s3 = s3_client(ceph)
    head = s3.head_object(Bucket=s3_bucket, Key="big.raw")
    assert head["ContentLength"] == size
    assert _hidden_state(s3, s3_bucket) == ([], [])
    peak_mib = _hwm_kib(pid) // 1024
    assert peak_mib < 400, f"daemon peak RSS {peak_mib} MiB for a 2 GiB upload"


def test_crash_leftovers_aborted_at_next_mount(mount_factory: Any, ceph: Any, s3_bucket: str,
                                               tmp_path: Path) -> None:
    table = s3_table(ceph, s3_bucket, tmp_path)
    m = mount_factory({"s": table})
    sh("cp", "/dev/null", m.path("s", "kept.raw"))
    pid = daemon_pid(m)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys,time; f=open(sys.argv[1],'wb'); f.write(b'N'*(24<<20)); f.flush();"
        "print('ready',flush=True); time.sleep(60)"), str(m.path("s", "new.raw"))],
        stdout=subprocess.PIPE, text=True)
    s3 = s3_client(ceph)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 30
        while not _hidden_state(s3, s3_bucket)[0] and time.monotonic() < deadline:
            time.sleep(0.2)  # parts stream in the background
        assert _hidden_state(s3, s3_bucket)[0], "expected a multipart upload in progress"
        os.kill(pid, signal.SIGKILL)
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        holder.kill()
        holder.wait()
    assert _hidden_state(s3, s3_bucket)[0], "the crash should leave its upload behind"
    r = subprocess.run([*IMAGEFS, "mount", str(m.config), str(m.root), "-o", f"log={m.log}"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert _hidden_state(s3, s3_bucket) == ([], [])
    assert os.listdir(m.path("s")) == ["kept.raw"]
    assert "store s: removed 1 upload(s) left by a crash" in m.log_text()


def test_foreign_objects_and_hidden_keys(mount_factory: Any, ceph: Any, s3_bucket: str,
                                         tmp_path: Path) -> None:
    """Objects put by other tools are readable; hidden and nested keys never show."""
    s3 = s3_client(ceph)
    body = os.urandom(3 * MiB + 7)
    s3.put_object(Bucket=s3_bucket, Key="foreign.raw", Body=body)
    s3.put_object(Bucket=s3_bucket, Key="dir/nested.raw", Body=b"x")
    s3.put_object(Bucket=s3_bucket, Key=".imagefs-up-otherhost_1_1_ab", Body=b"x")
    m = mount_factory({"s": s3_table(ceph, s3_bucket, tmp_path)})
    assert os.listdir(m.path("s")) == ["foreign.raw"]
    assert m.path("s", "foreign.raw").read_bytes() == body
    st = os.stat(m.path("s", "foreign.raw"))
    assert st.st_size == len(body) and abs(st.st_mtime - time.time()) < 600
    # another host's fresh leftover is not touched (its owner may be alive)
    assert _hidden_state(s3, s3_bucket)[1] == [".imagefs-up-otherhost_1_1_ab"]


class _FreezableProxy:
    """A TCP relay to RGW that can stop relaying: a backend that accepts and never answers."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.frozen = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            up = socket.create_connection(self.target)
            for a, b in ((client, up), (up, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                while self.frozen.is_set():
                    time.sleep(0.1)
                b.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.frozen.clear()
        self.sock.close()


def test_frozen_endpoint_ends_in_eio_not_hang(mount_factory: Any, ceph: Any, s3_bucket: str,
                                              tmp_path: Path) -> None:
    host, port = ceph.s3_endpoint.split("://")[1].split(":")
    proxy = _FreezableProxy((host, int(port)))
    try:
        table = s3_table(ceph, s3_bucket, tmp_path, max_attempts=2, timeout=3,
                         endpoint_url=f"http://127.0.0.1:{proxy.port}")
        m = mount_factory({"s": table}, cache={"readahead": "1MiB"}, metadata_ttl=0)
        make_file(tmp_path / "a.raw", 8 * MiB, "f")
        sh("cp", tmp_path / "a.raw", m.path("s", "a.raw"))
        with open(m.path("s", "a.raw"), "rb", buffering=0) as f:
            f.read(4096)
            proxy.frozen.set()
            started = time.monotonic()
            with pytest.raises(OSError) as e:
                f.seek(6 * MiB)
                f.read(MiB)
            assert e.value.errno == errno.EIO
            took = time.monotonic() - started
        with pytest.raises(OSError) as e:
            (m.path("s", "b.raw")).write_bytes(b"x" * (12 * MiB))  # multipart
        assert e.value.errno == errno.EIO
        print(f"frozen endpoint: read failed with EIO after {took:.1f} s")
        # the failed upload left nothing visible; the next mount clears what it left hidden
        proxy.frozen.clear()
        s3 = s3_client(ceph)
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
        assert [k for k in keys if not k.startswith(".imagefs-")] == ["a.raw"]
        unmount(m)
        m = mount_factory({"s": table})
        assert os.listdir(m.path("s")) == ["a.raw"]
        assert _hidden_state(s3, s3_bucket) == ([], [])
    finally:
        proxy.close()


@pytest.mark.parametrize("threshold", ["5GiB", "5MiB"], ids=["copy", "multipart-copy"])
def test_copies_are_pinned_to_the_source_version(ceph: Any, s3_bucket: str, tmp_path: Path,
                                                 threshold: str) -> None:
    """A server-side copy (rename, metadata change) of a version that was replaced meanwhile
    fails with Changed and publishes nothing: RGW ignores the standard copy conditions, so the
    store mirrors If-Match for CopyObject and re-checks the source before completing a
    multipart copy."""
    from imagefs import config
    from imagefs.stores import build
    from imagefs.stores.base import Changed
    from imagefs.stores.s3.copy import copy
    from tests.mounting import write_config

    table = s3_table(ceph, s3_bucket, tmp_path, multipart_copy_threshold=threshold)
    store = build(config.load(write_config(tmp_path, {"s": table})).stores[0])
    store.open()
    try:
        s3 = s3_client(ceph)
        s3.put_object(Bucket=s3_bucket, Key="a.raw", Body=b"o" * (12 * MiB))
        pinned = s3.head_object(Bucket=s3_bucket, Key="a.raw")
        time.sleep(1.1)
        s3.put_object(Bucket=s3_bucket, Key="a.raw", Body=b"n" * (12 * MiB))
        with pytest.raises(Changed):
            copy(store, "a.raw", "b.raw", {}, pinned, 12 * MiB)
        assert [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]] == ["a.raw"]
        assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
        # an unchanged source copies, and rename removes it
        info = store.rename("a.raw", "c.raw")
        assert info.size == 12 * MiB
        body = s3.get_object(Bucket=s3_bucket, Key="c.raw")["Body"].read()
        assert body == b"n" * (12 * MiB)
        assert [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]] == ["c.raw"]
    finally:
        store.close()


def test_uploads_share_the_stores_part_memory(ceph: Any, s3_bucket: str,
                                              tmp_path: Path) -> None:
    """Six uploads at once into a store whose ``upload_memory`` holds four parts: part
    buffers of all uploads together never exceed it (the rest go to temporary files), every
    image arrives intact, and an abort gives its memory back."""
    from imagefs import config
    from imagefs.stores import build
    from tests.mounting import write_config

    table = s3_table(ceph, s3_bucket, tmp_path, upload_memory="20MiB", upload_concurrency=1)
    store = build(config.load(write_config(tmp_path, {"s": table})).stores[0])
    store.open()
    try:
        datas = {f"i{n}.raw": os.urandom(17 * MiB + n) for n in range(6)}
        ready = threading.Barrier(len(datas) + 1)
        infos: dict[str, Any] = {}
        errors: list[BaseException] = []

        def one(name: str, data: bytes) -> None:
            try:
                up = store.upload(name)
                for off in range(0, 12 * MiB, MiB):  # parts 1-2 sent, part 3 buffered
                    up.write(off, data[off:off + MiB])
                ready.wait(60)
                for off in range(12 * MiB, len(data), MiB):
                    up.write(off, data[off:off + MiB])
                infos[name] = up.commit({})
            except BaseException as e:
                errors.append(e)
                ready.abort()

        threads = [threading.Thread(target=one, args=kv) for kv in datas.items()]
        for t in threads:
            t.start()
        ready.wait(60)
        held = store.memory.used  # every writer holds a part buffer now
        for t in threads:
            t.join(300)
        assert not errors, errors
        assert 0 < held <= store.upload_memory
        assert store.memory.peak <= store.upload_memory
        assert store.memory.refused > 0, "the budget never bound: the test proves nothing"
        assert store.memory.used == 0
        s3 = s3_client(ceph)
        for name, data in datas.items():
            assert infos[name].size == len(data)
            body = s3.get_object(Bucket=s3_bucket, Key=name)["Body"].read()
            assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest(), name
        up = store.upload("gone.raw")
        up.write(0, datas["i0.raw"][:3 * MiB])
        assert store.memory.used == 5 * MiB
        up.abort()
        assert store.memory.used == 0
        print(f"6 uploads: peak part memory {store.memory.peak / MiB:.0f} MiB of "
              f"{store.upload_memory / MiB:.0f}; {store.memory.refused} parts went to files")
    finally:
        store.close()


def test_listing_pages_past_1000_objects(mount_factory: Any, ceph: Any, s3_bucket: str,
                                         tmp_path: Path) -> None:
    """ListObjectsV2 answers 1,000 keys a page: every page is read, hidden keys never show."""
    from concurrent.futures import ThreadPoolExecutor

    s3 = s3_client(ceph)
    names = [f"img-{i:05d}.raw" for i in range(1234)]
    with ThreadPoolExecutor(16) as ex:
        list(ex.map(lambda n: s3.put_object(Bucket=s3_bucket, Key=n, Body=n.encode()),
                    [*names, ".imagefs-up-otherhost_1_1_ab"]))
    m = mount_factory({"s": s3_table(ceph, s3_bucket, tmp_path)})
    assert sorted(os.listdir(m.path("s"))) == names
    assert m.path("s", names[-1]).read_bytes() == names[-1].encode()
