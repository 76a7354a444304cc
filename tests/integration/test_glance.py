"""Glance multi-store chores: hashes as xattrs, imagefs copy/hash/verify, locations."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_common import MiB, make_file
from tests.mounting import IMAGEFS, Mount


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*IMAGEFS, *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def xattrs(path: Path) -> dict[str, str]:
    return {k.removeprefix("user.imagefs."): os.getxattr(path, k).decode()
            for k in os.listxattr(path)}


def three_file_stores(mount_factory: Any, tmp_path: Path,
                      default: str | None = None) -> tuple[Mount, dict[str, Path]]:
    dirs = {n: tmp_path / f"store-{n}" for n in ("a", "b", "c", "ro")}
    for d in dirs.values():
        d.mkdir()
    m = mount_factory({n: {"type": "file", "path": str(d), "read_only": n == "ro",
                           "default": n == default}
                       for n, d in dirs.items()})
    return m, dirs


def test_hashes_written_with_the_image(mount_factory: Any, tmp_path: Path) -> None:
    m, dirs = three_file_stores(mount_factory, tmp_path)
    src = tmp_path / "img.raw"
    make_file(src, 5 * MiB + 3, "h")
    data = src.read_bytes()
    subprocess.run(["cp", str(src), str(m.path("a", "img.raw"))], check=True)
    xa = xattrs(m.path("a", "img.raw"))
    assert xa["os_hash_algo"] == "sha512"
    assert xa["os_hash_value"] == hashlib.sha512(data).hexdigest()
    assert xa["checksum"] == hashlib.md5(data).hexdigest()
    assert xa["location"] == f"file://{dirs['a']}/img.raw"
    # random writes (qemu-img style) get the hash from the single publishing pass
    with open(m.path("a", "rnd.raw"), "wb") as f:
        f.seek(3 * MiB)
        f.write(b"tail")
        f.seek(0)
        f.write(b"head")
    want = b"head" + bytes(3 * MiB - 4) + b"tail"
    assert xattrs(m.path("a", "rnd.raw"))["os_hash_value"] == hashlib.sha512(want).hexdigest()


def test_copy_to_all_stores_verify_and_hash(mount_factory: Any, tmp_path: Path) -> None:
    m, dirs = three_file_stores(mount_factory, tmp_path)
    make_file(dirs["a"] / "vm.raw", 9 * MiB, "vm")  # arrived another way: no stored hash
    assert run_cli("verify", m.path("a", "vm.raw")).returncode == 3
    r = run_cli("hash", m.path("a", "vm.raw"))
    assert r.returncode == 0, r.stderr
    digest = hashlib.sha512((dirs["a"] / "vm.raw").read_bytes()).hexdigest()
    assert xattrs(m.path("a", "vm.raw"))["os_hash_value"] == digest
    r = run_cli("copy", m.path("a", "vm.raw"), "--all-stores")
    assert r.returncode == 0, r.stderr
    for s in ("b", "c"):
        assert (dirs[s] / "vm.raw").read_bytes() == (dirs["a"] / "vm.raw").read_bytes()
        assert run_cli("verify", m.path(s, "vm.raw")).returncode == 0
    assert not (dirs["ro"] / "vm.raw").exists()


def test_copy_refuses_read_only_before_moving_bytes(mount_factory: Any, tmp_path: Path) -> None:
    m, dirs = three_file_stores(mount_factory, tmp_path)
    make_file(dirs["a"] / "vm.raw", MiB, "vm")
    r = run_cli("copy", m.path("a", "vm.raw"), "--to", "b,ro")
    assert r.returncode == 2 and "read-only" in r.stderr
    assert not (dirs["b"] / "vm.raw").exists()
    r = run_cli("copy", m.path("a", "vm.raw"), "--to", "nosuch")
    assert r.returncode == 2 and "unknown store" in r.stderr


def test_copy_failure_rolls_back_unless_partial(mount_factory: Any, tmp_path: Path) -> None:
    m, dirs = three_file_stores(mount_factory, tmp_path)
    make_file(dirs["a"] / "vm.raw", 3 * MiB, "vm")
    os.rmdir(dirs["c"])  # the store's directory vanished under the mount: writes fail
    r = run_cli("copy", m.path("a", "vm.raw"), "--to", "b,c")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "c:" in r.stderr
    assert not (dirs["b"] / "vm.raw").exists(), "a failed copy left a replica behind"
    r = run_cli("copy", m.path("a", "vm.raw"), "--to", "b,c", "--allow-partial")
    assert r.returncode == 4, r.stdout + r.stderr
    assert (dirs["b"] / "vm.raw").read_bytes() == (dirs["a"] / "vm.raw").read_bytes()


def test_discard_xattr_drops_a_pending_write(mount_factory: Any, tmp_path: Path) -> None:
    """``user.imagefs.discard`` on a file open for writing: the close publishes nothing and
    the image published before stays as it was."""
    m, dirs = three_file_stores(mount_factory, tmp_path)
    make_file(dirs["a"] / "old.raw", MiB, "old")
    before = (dirs["a"] / "old.raw").read_bytes()
    for name in ("old.raw", "new.raw"):
        with open(m.path("a", name), "wb", buffering=0) as f:
            f.write(b"partial" * 1000)
            os.setxattr(f.fileno(), "user.imagefs.discard", b"1")
            with pytest.raises(OSError) as e:
                f.write(b"more")
            assert e.value.errno == errno.EIO
    assert (dirs["a"] / "old.raw").read_bytes() == before
    assert m.path("a", "old.raw").read_bytes() == before
    assert not m.path("a", "new.raw").exists()
    assert sorted(os.listdir(dirs["a"])) == ["old.raw"]  # no hidden upload left either
    with pytest.raises(OSError) as e:  # nothing pending on a plain image
        os.setxattr(m.path("a", "old.raw"), "user.imagefs.discard", b"1")
    assert e.value.errno == errno.EINVAL


def test_copy_never_removes_what_it_did_not_make(mount_factory: Any, tmp_path: Path) -> None:
    """An image already in a destination is refused (other content) or left alone (same
    content); the source reached through MOUNTPOINT/default is neither a destination nor
    removed by a roll-back."""
    m, dirs = three_file_stores(mount_factory, tmp_path, default="a")
    make_file(dirs["a"] / "vm.raw", 3 * MiB, "vm")
    assert run_cli("hash", m.path("a", "vm.raw")).returncode == 0
    make_file(dirs["b"] / "vm.raw", 2 * MiB, "other")
    other = (dirs["b"] / "vm.raw").read_bytes()
    r = run_cli("copy", m.path("a", "vm.raw"), "--to", "b,c")
    assert r.returncode == 2 and "already exists" in r.stderr, r.stderr
    assert (dirs["b"] / "vm.raw").read_bytes() == other
    assert not (dirs["c"] / "vm.raw").exists()
    os.rename(m.path("b", "vm.raw"), m.path("b", "other.raw"))
    r = run_cli("copy", m.path("a", "vm.raw"), "--to", "b")
    assert r.returncode == 0, r.stderr
    r = run_cli("copy", m.path("a", "vm.raw"), "--to", "b")  # a re-run moves no byte
    assert r.returncode == 0 and "already holds" in r.stdout, r.stdout + r.stderr
    default = m.root / "default"
    assert default.is_symlink()
    src = (dirs["a"] / "vm.raw").read_bytes()
    os.rmdir(dirs["c"])  # the failing destination
    r = run_cli("copy", default / "vm.raw", "--all-stores")
    assert r.returncode == 1, r.stdout + r.stderr
    assert (dirs["a"] / "vm.raw").read_bytes() == src, "the source was touched"
    assert (dirs["b"] / "vm.raw").read_bytes() == src, "an identical copy was removed"
    r = run_cli("copy", default / "vm.raw", "--to", "a")
    assert r.returncode == 2 and "own store" in r.stderr


def test_copy_with_a_source_read_error_publishes_nothing(mount_factory: Any,
                                                          tmp_path: Path) -> None:
    """The source changes under the copy (its reads become EIO): no destination publishes a
    truncated image, and images already there stay."""
    m, dirs = three_file_stores(mount_factory, tmp_path)
    big = dirs["a"] / "big.raw"
    with open(big, "wb") as f:
        f.truncate(768 * MiB)  # sparse: fast to make, slow enough to copy twice
    p = subprocess.Popen([*IMAGEFS, "copy", str(m.path("a", "big.raw")), "--to", "b,c"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    target = str(m.path("a", "big.raw"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait until it has the source open
        try:
            if any(os.readlink(f"/proc/{p.pid}/fd/{fd}") == target
                   for fd in os.listdir(f"/proc/{p.pid}/fd")):
                break
        except OSError:
            pass
        time.sleep(0.005)
    repl = dirs["a"] / "big.new"
    repl.write_bytes(b"replaced")
    os.replace(repl, big)  # a new version: reads pinned to the old one fail
    out, err = p.communicate(timeout=300)
    assert p.returncode == 1, out + err
    assert "no copy was published" in err, err
    assert not (dirs["b"] / "big.raw").exists() and not (dirs["c"] / "big.raw").exists()
    assert os.listdir(dirs["b"]) == [] and os.listdir(dirs["c"]) == []


def test_hash_stores_all_three_for_the_version_it_read(mount_factory: Any,
                                                        tmp_path: Path) -> None:
    """``imagefs hash`` uses the mount's [hash] algo and stores algo, value and md5 in one
    update; hashes computed from a version that has since been replaced are refused (ESTALE),
    as are malformed ones (EINVAL), and the image keeps what it had."""
    d = tmp_path / "store"
    d.mkdir()
    m = mount_factory({"a": {"type": "file", "path": str(d)}}, hash={"algo": "sha256"})
    assert xattrs(m.path("a"))["hash_algo"] == "sha256"
    make_file(d / "vm.raw", 3 * MiB + 1, "vm")  # arrived another way: no stored hash
    r = run_cli("hash", m.path("a", "vm.raw"))
    assert r.returncode == 0, r.stderr
    data = (d / "vm.raw").read_bytes()
    xa = xattrs(m.path("a", "vm.raw"))
    assert (xa["os_hash_algo"], xa["os_hash_value"], xa["checksum"]) == (
        "sha256", hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest())
    assert run_cli("verify", m.path("a", "vm.raw")).returncode == 0

    old_version = xa["version"]
    stale = {"version": old_version, "os_hash_algo": "sha512",
             "os_hash_value": hashlib.sha512(data).hexdigest(),
             "checksum": hashlib.md5(data).hexdigest()}
    make_file(m.path("a", "vm.raw"), 2 * MiB, "replaced")  # replaced through the mount
    assert xattrs(m.path("a", "vm.raw"))["version"] != old_version
    with pytest.raises(OSError) as e:
        os.setxattr(m.path("a", "vm.raw"), "user.imagefs.hashes", json.dumps(stale).encode())
    assert e.value.errno == errno.ESTALE
    new = (d / "vm.raw").read_bytes()
    assert xattrs(m.path("a", "vm.raw"))["os_hash_value"] == hashlib.sha256(new).hexdigest()

    for bad in (b"not json", json.dumps({**stale, "os_hash_value": "00"}).encode(),
                json.dumps({**stale, "os_hash_algo": "crc32"}).encode(),
                json.dumps({**stale, "extra": "x"}).encode()):
        with pytest.raises(OSError) as e:
            os.setxattr(m.path("a", "vm.raw"), "user.imagefs.hashes", bad)
        assert e.value.errno == errno.EINVAL, bad
    assert xattrs(m.path("a", "vm.raw"))["os_hash_value"] == hashlib.sha256(new).hexdigest()
    assert run_cli("verify", m.path("a", "vm.raw")).returncode == 0
