"""Glance multi-store chores: hashes as xattrs, imagefs copy/hash/verify, locations."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

from tests.integration.test_common import MiB, make_file
from tests.mounting import IMAGEFS, Mount


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*IMAGEFS, *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def xattrs(path: Path) -> dict[str, str]:
    return {k.removeprefix("user.imagefs."): os.getxattr(path, k).decode()
            for k in os.listxattr(path)}


def three_file_stores(mount_factory: Any, tmp_path: Path) -> tuple[Mount, dict[str, Path]]:
    dirs = {n: tmp_path / f"store-{n}" for n in ("a", "b", "c", "ro")}
    for d in dirs.values():
        d.mkdir()
    m = mount_factory({n: {"type": "file", "path": str(d), "read_only": n == "ro"}
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
