"""The behaviour every writable store kind must show through a real mount, driven by real tools.

Each test runs once per kind (file, s3, rbd, swift, rgw_swift, cinder: see
conftest.store_table) on a fresh backend container/pool/bucket/project, beside a local file
store to copy to and from.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.mounting import Mount, daemon_pid, tool, unmount

MiB = 1 << 20


def sh(*argv: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a real program; on failure the assertion shows its output."""
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=600)
    if check:
        assert r.returncode == 0, f"{argv[0]} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r


def make_file(path: Path, size: int, seed: str = "x") -> str:
    """Deterministic non-repeating content; returns its sha256."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for i in range(0, size, MiB):
            block = hashlib.sha512(f"{seed}{i}".encode()).digest() * (MiB // 64)
            block = block[: min(MiB, size - i)]
            f.write(block)
            h.update(block)
    return h.hexdigest()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture
def m(mount_factory: Any, store_table: dict[str, Any], local_store_table: dict[str, Any]
      ) -> Mount:
    """A mount with the store under test as "s" and a local file store as "local"."""
    return mount_factory({"s": store_table, "local": local_store_table})


def test_cp_in_and_out(m: Mount, tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    digest = make_file(src, 20 * MiB + 12345)
    sh("cp", src, m.path("s", "img.raw"))
    assert os.stat(m.path("s", "img.raw")).st_size == 20 * MiB + 12345
    assert "img.raw" in os.listdir(m.path("s"))
    sh("cmp", src, m.path("s", "img.raw"))
    sh("cp", m.path("s", "img.raw"), tmp_path / "back.raw")
    assert sha256(tmp_path / "back.raw") == digest
    # between stores, both ways
    sh("cp", m.path("s", "img.raw"), m.path("local", "copy.raw"))
    sh("cp", m.path("local", "copy.raw"), m.path("s", "copy2.raw"))
    assert sha256(m.path("s", "copy2.raw")) == digest


def test_invisible_until_closed(m: Mount) -> None:
    path = m.path("s", "pending.raw")
    with open(path, "wb") as f:
        f.write(b"a" * MiB)
        f.flush()
        assert "pending.raw" not in os.listdir(m.path("s"))
        r = subprocess.run(["stat", str(path)], capture_output=True)
        assert r.returncode != 0, "another process saw an image still being written"
        f.write(b"b" * MiB)
    assert os.stat(path).st_size == 2 * MiB
    with open(path, "rb") as f:
        assert f.read() == b"a" * MiB + b"b" * MiB


def test_overwrite_keeps_old_until_close(m: Mount) -> None:
    path = m.path("s", "v.raw")
    path.write_bytes(b"old" * 1000)
    with open(path, "r+b") as f:  # no O_TRUNC: seeded with the old bytes on first change
        f.seek(3)
        f.write(b"NEW")
        f.flush()
        r = subprocess.run(["cat", str(path)], capture_output=True)
        assert r.stdout == b"old" * 1000
    assert path.read_bytes() == b"old" + b"NEW" + b"old" * 998


def test_hashes_are_stored_only_for_the_version_they_were_computed_from(m: Mount) -> None:
    """``user.imagefs.hashes`` carries the version it was computed from; the store checks it
    in the same operation that stores them (ESTALE after a replacement)."""
    path = m.path("s", "h.raw")
    path.write_bytes(b"1" * 5000)
    v1 = os.getxattr(path, "user.imagefs.version").decode()
    doc = {"version": v1, "os_hash_algo": "sha256",
           "os_hash_value": hashlib.sha256(b"1" * 5000).hexdigest(),
           "checksum": hashlib.md5(b"1" * 5000).hexdigest()}
    os.setxattr(path, "user.imagefs.hashes", json.dumps(doc).encode())
    assert os.getxattr(path, "user.imagefs.os_hash_value").decode() == doc["os_hash_value"]
    tmp = m.path("s", "h.tmp")
    tmp.write_bytes(b"2" * 6000)
    os.rename(tmp, path)
    with pytest.raises(OSError) as e:
        os.setxattr(path, "user.imagefs.hashes", json.dumps(doc).encode())
    assert e.value.errno == errno.ESTALE
    assert os.getxattr(path, "user.imagefs.checksum").decode() == \
        hashlib.md5(b"2" * 6000).hexdigest()


def test_truncate_then_write_keeps_the_prefix(m: Mount, tmp_path: Path) -> None:
    """ftruncate first (dd without conv=notrunc): only the kept prefix is fetched to start
    from; what was cut stays cut, what follows is written."""
    path = m.path("s", "t.raw")
    make_file(path, 3 * MiB + 7, "t")
    old = path.read_bytes()
    with open(path, "r+b", buffering=0) as f:
        f.truncate(MiB + 5)
        f.write(b"X")
        f.seek(MiB + 5)
        f.write(b"tail")
    assert path.read_bytes() == b"X" + old[1:MiB + 5] + b"tail"
    (tmp_path / "small").write_bytes(b"s" * 1000)
    sh("dd", f"if={tmp_path / 'small'}", f"of={path}", "bs=64k", "status=none")
    assert path.read_bytes() == b"s" * 1000


def test_rsync_twice_copies_nothing(m: Mount, tmp_path: Path) -> None:
    tool("rsync")
    src = tmp_path / "tree"
    src.mkdir()
    make_file(src / "a.raw", 3 * MiB, "a")
    make_file(src / "b.qcow2", MiB + 7, "b")
    os.chmod(src / "b.qcow2", 0o600)
    dest = str(m.path("s")) + "/"
    sh("rsync", "-a", f"{src}/", dest)
    for name in ("a.raw", "b.qcow2"):
        st_src, st_dst = os.stat(src / name), os.stat(m.path("s", name))
        assert st_dst.st_size == st_src.st_size
        assert int(st_dst.st_mtime) == int(st_src.st_mtime)
        assert st_dst.st_mode & 0o777 == st_src.st_mode & 0o777
        assert sha256(m.path("s", name)) == sha256(src / name)
    second = sh("rsync", "-a", "--itemize-changes", f"{src}/", dest)
    assert second.stdout.strip() == "", second.stdout
    assert not [n for n in os.listdir(m.path("s")) if n.startswith(".")]


def test_rsync_of_images_owned_by_others(mount_factory: Any, store_table: dict[str, Any],
                                         tmp_path: Path) -> None:
    """rsync -a as root of images owned by another user (glance, libvirt-qemu): the store's
    ``chown`` setting says what happens: refused (EPERM, rsync exit 23), accepted and dropped,
    or kept as image metadata, persistent across mounts, so a second run changes nothing."""
    tool("rsync")
    src = tmp_path / "tree"
    src.mkdir()
    make_file(src / "a.raw", 2 * MiB + 5, "own")
    os.chown(src / "a.raw", 4242, 4343)
    for policy in ("refuse", "ignore", "keep"):
        m = mount_factory({"s": {**store_table, "chown": policy}})
        dest = m.path("s")
        r = sh("rsync", "-a", f"{src}/", f"{dest}/", check=False)
        st = os.stat(dest / "a.raw")
        if policy == "refuse":
            assert r.returncode == 23 and "Operation not permitted" in r.stderr, r.stderr
        else:
            assert r.returncode == 0, r.stderr
            assert sha256(dest / "a.raw") == sha256(src / "a.raw")
        if policy == "keep":
            assert (st.st_uid, st.st_gid) == (4242, 4343)
            second = sh("rsync", "-a", "--itemize-changes", f"{src}/", f"{dest}/")
            assert second.stdout.strip() == "", second.stdout
            unmount(m)
            m = mount_factory({"s": {**store_table, "chown": policy}})
            st = os.stat(m.path("s", "a.raw"))
            assert (st.st_uid, st.st_gid) == (4242, 4343), "owner not persisted"
            os.chown(m.path("s", "a.raw"), 0, 0)
            st = os.stat(m.path("s", "a.raw"))
            assert (st.st_uid, st.st_gid) == (0, 0)
        else:
            assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
        os.unlink(m.path("s", "a.raw"))
        unmount(m)


def _spool_bytes(pid: int) -> int:
    """Disk blocks held by the daemon's (unlinked) spool files."""
    total = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if "/spool-" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                total += os.stat(f"/proc/{pid}/fd/{fd}").st_blocks * 512
        except OSError:
            continue
    return total


def test_streamed_upload_trims_its_spool(mount_factory: Any, store_table: dict[str, Any]
                                         ) -> None:
    """Stores that spool (s3, swift): a long in-order write drops what it has sent from the
    local spool, so disk use does not grow with the image; a later write before the end then
    fails with EIO and publishes nothing, never wrong bytes."""
    if store_table["type"] not in ("s3", "swift"):
        pytest.skip("writes go straight to this store: no spool")
    m = mount_factory({"s": store_table}, cache={"spool_trim_after": "8MiB"})
    pid = daemon_pid(m)
    size = 200 * MiB
    for name, rewind in (("kept.raw", False), ("broken.raw", True)):
        h = hashlib.sha256()
        fd = os.open(m.path("s", name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for off in range(0, size, MiB):
                block = hashlib.sha512(f"{name}{off}".encode()).digest() * (MiB // 64)
                os.write(fd, block)
                h.update(block)
            os.fsync(fd)  # the stream has caught up: the spool is trimmed by now
            held = _spool_bytes(pid)
            assert held <= 100 * MiB, f"spool holds {held / MiB:.0f} MiB of a 200 MiB image"
            if rewind:
                with pytest.raises(OSError) as e:
                    os.pwrite(fd, b"header", 0)
                assert e.value.errno == errno.EIO
        finally:
            try:
                os.close(fd)
            except OSError:
                assert rewind, "close failed for an in-order write"
        if not rewind:
            assert sha256(m.path("s", name)) == h.hexdigest()
    assert os.listdir(m.path("s")) == ["kept.raw"]
    assert "dropped from the local spool" in m.log_text()


def test_dd_and_sha256(m: Mount, tmp_path: Path) -> None:
    src = tmp_path / "d.raw"
    digest = make_file(src, 9 * MiB, "dd")
    sh("dd", f"if={src}", f"of={m.path('s', 'dd.raw')}", "bs=1M", "conv=fsync", "status=none")
    assert sh("sha256sum", m.path("s", "dd.raw")).stdout.split()[0] == digest
    part = tmp_path / "part"
    sh("dd", f"if={m.path('s', 'dd.raw')}", f"of={part}", "bs=64k", "skip=17", "count=3",
       "status=none")
    assert part.read_bytes() == src.read_bytes()[17 * 65536:20 * 65536]


def test_a_size_set_by_truncate_past_the_writes_publishes_zeros_and_their_hashes(
        m: Mount) -> None:
    """Written in order, then extended by ftruncate before the close: the tail goes up as
    zeros (S3 reads it from past the end of its spool, into a part already half full of
    data), and the close's hashes are those of the bytes published."""
    data = hashlib.sha512(b"tail").digest() * ((10 * MiB + 64) // 64)
    data = data[:10 * MiB + 3]
    size = 21 * MiB + 5
    path = m.path("s", "extended.raw")
    with open(path, "wb") as f:
        for off in range(0, len(data), MiB):
            f.write(data[off:off + MiB])
        f.truncate(size)
    want = data + bytes(size - len(data))
    with open(path, "rb") as f:
        got = f.read()
    assert len(got) == size and hashlib.sha256(got).digest() == hashlib.sha256(want).digest()
    hashes = {k: os.getxattr(path, f"user.imagefs.{k}").decode()
              for k in ("os_hash_value", "checksum")}
    assert hashes == {"os_hash_value": hashlib.sha512(want).hexdigest(),
                      "checksum": hashlib.md5(want).hexdigest()}


def test_qemu_img(m: Mount, tmp_path: Path) -> None:
    tool("qemu-img")
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as f:  # sparse with data at scattered places
        f.truncate(64 * MiB)
        for off in (0, 5 * MiB + 3, 33 * MiB, 64 * MiB - 4096):
            f.seek(off)
            f.write(hashlib.sha512(str(off).encode()).digest() * 64)
    q = m.path("s", "disk.qcow2")
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, q)
    sh("qemu-img", "check", q)
    info = sh("qemu-img", "info", "--output=json", q).stdout
    assert '"virtual-size": 67108864' in info
    sh("qemu-img", "compare", "-f", "raw", "-F", "qcow2", raw, q)
    # qcow2 → raw within the store, and create
    sh("qemu-img", "convert", "-O", "raw", q, m.path("s", "disk2.raw"))
    sh("qemu-img", "compare", "-f", "raw", "-F", "raw", raw, m.path("s", "disk2.raw"))
    sh("qemu-img", "create", "-f", "qcow2", m.path("s", "new.qcow2"), "1G")
    sh("qemu-img", "check", m.path("s", "new.qcow2"))


def test_fio_verify(m: Mount) -> None:
    tool("fio")
    for rw in ("write", "randwrite"):
        r = sh("fio", "--name=v", f"--filename={m.path('s', f'fio-{rw}.img')}", "--size=16M",
               f"--rw={rw}", "--bs=64k", "--ioengine=psync", "--verify=crc32c",
               "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
               "--output-format=terse", check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        # the published image verifies after close too, read back by a fresh fio
        r = sh("fio", "--name=v", f"--filename={m.path('s', f'fio-{rw}.img')}", "--size=16M",
               f"--rw={'read' if rw == 'write' else 'randread'}", "--bs=64k",
               "--ioengine=psync", "--verify=crc32c", "--verify_only", "--verify_fatal=1",
               "--verify_state_save=0",
               "--randrepeat=1", check=False)
        assert r.returncode == 0, r.stdout + r.stderr


def test_concurrent_readers(m: Mount, tmp_path: Path) -> None:
    src = tmp_path / "c.raw"
    digest = make_file(src, 24 * MiB, "c")
    sh("cp", src, m.path("s", "c.raw"))
    expected = src.read_bytes()
    errors: list[str] = []

    def reader(i: int) -> None:
        try:
            with open(m.path("s", "c.raw"), "rb", buffering=0) as f:
                for k in range(40):
                    off = ((i * 7919 + k * 104729) * 4096) % (24 * MiB - 65536)
                    f.seek(off)
                    if f.read(65536) != expected[off:off + 65536]:
                        errors.append(f"reader {i} wrong bytes at {off}")
        except OSError as e:
            errors.append(f"reader {i}: {e}")

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    whole = threading.Thread(target=lambda: errors.extend(
        [] if sha256(m.path("s", "c.raw")) == digest else ["sequential reader: bad sha256"]))
    whole.start()
    for t in [*threads, whole]:
        t.join()
    assert errors == []


def test_rename_replace_and_cross_store(m: Mount) -> None:
    a, b = m.path("s", "a.raw"), m.path("s", "b.raw")
    a.write_bytes(b"A" * 300_000)
    b.write_bytes(b"B" * 1000)
    os.rename(a, b)
    assert not a.exists()
    assert b.read_bytes() == b"A" * 300_000
    with pytest.raises(OSError) as e:
        os.rename(b, m.path("local", "b.raw"))
    assert e.value.errno == errno.EXDEV
    sh("mv", b, m.path("local", "b.raw"))  # mv falls back to copy + unlink
    assert m.path("local", "b.raw").read_bytes() == b"A" * 300_000
    assert not b.exists()


def test_unlink_chmod_touch_persist(m: Mount, tmp_path: Path) -> None:
    p = m.path("s", "meta.raw")
    p.write_bytes(b"z" * 5000)
    os.chmod(p, 0o640)
    os.utime(p, (1_600_000_000, 1_600_000_000))
    st = os.stat(p)
    assert st.st_mode & 0o777 == 0o640 and int(st.st_mtime) == 1_600_000_000
    p.unlink()
    assert not p.exists()
    with pytest.raises(FileNotFoundError):
        os.stat(p)


def test_persists_across_remount(mount_factory: Any, store_table: dict[str, Any],
                                 tmp_path: Path) -> None:
    m1 = mount_factory({"s": store_table})
    p = m1.path("s", "keep.raw")
    p.write_bytes(b"k" * 70000)
    os.chmod(p, 0o600)
    os.utime(p, (1_500_000_000, 1_500_000_000))
    unmount(m1)
    m2 = mount_factory({"s": store_table})
    st = os.stat(m2.path("s", "keep.raw"))
    assert (st.st_size, st.st_mode & 0o777, int(st.st_mtime)) == (70000, 0o600, 1_500_000_000)
    assert m2.path("s", "keep.raw").read_bytes() == b"k" * 70000


def test_hostile_names(m: Mount) -> None:
    store = m.path("s")
    for bad, code in ((".imagefs-x", errno.EINVAL), ("x" * 256, errno.ENAMETOOLONG)):
        with pytest.raises(OSError) as e:
            open(store / bad, "wb").close()
        assert e.value.errno == code
    with pytest.raises(OSError) as e:
        os.mkdir(store / "sub")
    assert e.value.errno == errno.EPERM
    with pytest.raises(OSError) as e:  # object stores and Glance need UTF-8 names
        os.close(os.open(os.fsencode(store) + b"/\xff\xfe.raw", os.O_WRONLY | os.O_CREAT))
    assert e.value.errno == errno.EINVAL
    odd = "ünïcødé name with spaces & 'quotes'.raw"
    (store / odd).write_bytes(b"u" * 10)
    assert odd in os.listdir(store)
    assert (store / odd).read_bytes() == b"u" * 10
