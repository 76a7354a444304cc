"""Permissions: what another user may do on an ``allow_other`` mount, and read-only stores.

The kernel checks permissions (the mount uses ``default_permissions``) against the mode and
owner imagefs reports, so these tests run real programs as a real other user (``nobody``,
through ``setpriv``) and compare each outcome with what the mode and owner allow. A read-only
store (``read_only = true``, or the whole mount with ``-o ro``) must refuse every change with
EROFS, also to root, whom the kernel's permission checks let through.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_model import backend_bytes
from tests.mounting import Mount, mount, tool, unmount

MiB = 1 << 20
NOBODY = 65534

#: Runs as the other user: each operation's outcome, "ok" or the errno's name.
_PROBE = r"""
import errno, json, os, sys
d = sys.argv[1]
p = lambda n: os.path.join(d, n)

def attempt(fn):
    try:
        out = fn()
        return "ok" if out is None else out
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))

def read(n):
    with open(p(n), "rb") as f:
        return "ok:" + str(len(f.read()))

def write(n, data):
    fd = os.open(p(n), os.O_WRONLY)
    try:
        os.pwrite(fd, data, 0)
    finally:
        os.close(fd)

def create(n):
    with open(p(n), "xb") as f:
        f.write(b"x")

ops = {
    "read pub": lambda: read("pub.raw"),
    "write pub": lambda: write("pub.raw", b"nobody"),
    "trunc-open pub": lambda: os.close(os.open(p("pub.raw"), os.O_RDONLY | os.O_TRUNC)),
    "truncate pub": lambda: os.truncate(p("pub.raw"), 0),
    "chmod pub": lambda: os.chmod(p("pub.raw"), 0o666),
    "unlink pub": lambda: os.unlink(p("pub.raw")),
    "rename pub": lambda: os.rename(p("pub.raw"), p("moved.raw")),
    "create": lambda: create("new.raw"),
    "read priv": lambda: read("priv.raw"),
    "write priv": lambda: write("priv.raw", b"nobody"),
    "read open": lambda: read("open.raw"),
    "write open": lambda: write("open.raw", b"NOBODY"),
    "read mine": lambda: read("mine.raw"),
    "write mine": lambda: write("mine.raw", b"MINE"),
    "chmod mine": lambda: os.chmod(p("mine.raw"), 0o640),
}
print(json.dumps({k: attempt(f) for k, f in ops.items()}))
"""


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may enter (pytest's tmp dirs are 0700), removed afterwards."""
    where = Path(tempfile.mkdtemp(prefix="imagefs-perm-"))
    os.chmod(where, 0o755)
    try:
        yield where
    finally:
        shutil.rmtree(where, ignore_errors=True)


def as_nobody(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                           "--clear-groups", "--inh-caps=-all", *map(str, argv)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_other_users_get_what_mode_and_owner_allow(kind: str, shared_dir: Path,
                                                   request: pytest.FixtureRequest) -> None:
    tool("setpriv")
    table = {**request.getfixturevalue(f"{kind}_store_table"), "chown": "keep"}
    m = mount(shared_dir / "m", {"s": table}, options=["allow_other"], metadata_ttl=0)
    try:
        m.root.parent.chmod(0o755)  # the mount point's parent: pytest made it 0700
        data = os.urandom(MiB)
        for name, mode in (("pub.raw", 0o644), ("priv.raw", 0o600), ("open.raw", 0o666),
                           ("mine.raw", 0o600)):
            m.path("s", name).write_bytes(data)
            os.chmod(m.path("s", name), mode)
        os.chown(m.path("s", "mine.raw"), NOBODY, NOBODY)
        st = os.stat(m.path("s", "mine.raw"))
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (NOBODY, NOBODY, 0o600)

        r = as_nobody("/usr/bin/python3", "-c", _PROBE, m.path("s"))
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        want = {
            "read pub": f"ok:{MiB}", "write pub": "EACCES", "trunc-open pub": "EACCES",
            "truncate pub": "EACCES", "chmod pub": "EPERM", "unlink pub": "EACCES",
            "rename pub": "EACCES", "create": "EACCES",
            "read priv": "EACCES", "write priv": "EACCES",
            "read open": f"ok:{MiB}", "write open": "ok",
            "read mine": f"ok:{MiB}", "write mine": "ok", "chmod mine": "ok",
        }
        assert got == want
        # What was allowed took effect, whole; what was refused changed nothing.
        assert m.path("s", "open.raw").read_bytes() == b"NOBODY" + data[6:]
        assert m.path("s", "mine.raw").read_bytes() == b"MINE" + data[4:]
        assert os.stat(m.path("s", "mine.raw")).st_mode & 0o777 == 0o640
        for name in ("pub.raw", "priv.raw"):
            assert m.path("s", name).read_bytes() == data  # root reads 0600 images too
        assert sorted(os.listdir(m.path("s"))) == ["mine.raw", "open.raw", "priv.raw",
                                                   "pub.raw"]
        assert backend_bytes(table, "open.raw") == b"NOBODY" + data[6:]
    finally:
        unmount(m)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _every_change(d: Path) -> dict[str, Any]:
    """Every way of changing a store, as root; each outcome is "ok" or the errno's name."""
    img, other = d / "img.raw", d / "other.raw"

    def attempt(fn: Any) -> str:
        try:
            fn()
            return "ok"
        except OSError as e:
            return errno.errorcode.get(e.errno or 0, str(e.errno))

    def write_existing(flags: int) -> None:
        fd = os.open(img, flags)
        try:
            os.pwrite(fd, b"root", 0)
        finally:
            os.close(fd)

    return {
        "create": attempt(lambda: (d / "new.raw").write_bytes(b"x")),
        "open O_WRONLY": attempt(lambda: write_existing(os.O_WRONLY)),
        "open O_RDWR": attempt(lambda: write_existing(os.O_RDWR)),
        "open O_RDONLY|O_TRUNC": attempt(lambda: os.close(os.open(img, os.O_RDONLY
                                                                   | os.O_TRUNC))),
        "truncate": attempt(lambda: os.truncate(img, 0)),
        "unlink": attempt(lambda: os.unlink(img)),
        "rename": attempt(lambda: os.rename(img, d / "renamed.raw")),
        "rename over": attempt(lambda: os.rename(other, img)),
        "chmod": attempt(lambda: os.chmod(img, 0o600)),
        "utime": attempt(lambda: os.utime(img, (1, 1))),
        "chown": attempt(lambda: os.chown(img, NOBODY, NOBODY)),
        "setxattr": attempt(lambda: os.setxattr(img, "user.imagefs.checksum", b"0" * 32)),
        "chmod store dir": attempt(lambda: os.chmod(d, 0o777)),
    }


# ``-o ro`` is the same check for every store type: once, on a file store.
@pytest.mark.parametrize(("kind", "how"), [("file", "store"), ("file", "mount"), ("s3", "store"),
                                           ("rbd", "store"), ("swift", "store")])
def test_read_only_store_refuses_every_change_even_for_root(
        kind: str, how: str, mount_factory: Any, request: pytest.FixtureRequest) -> None:
    """``read_only = true`` on a store, or ``-o ro`` on the mount: EROFS for every change,
    and the image stays what it was (by the mount and by the backend's own client)."""
    table = request.getfixturevalue(f"{kind}_store_table")
    data = os.urandom(MiB)
    w = mount_factory({"s": table}, metadata_ttl=0)
    for name in ("img.raw", "other.raw"):
        w.path("s", name).write_bytes(data)
    if how == "store":
        ro: Mount = mount_factory({"s": {**table, "read_only": True}}, metadata_ttl=0)
    else:
        ro = mount_factory({"s": table}, metadata_ttl=0, options=["ro"])
    got = _every_change(ro.path("s"))
    assert got == {k: "EROFS" for k in got}
    assert sorted(os.listdir(ro.path("s"))) == ["img.raw", "other.raw"]
    assert ro.path("s", "img.raw").read_bytes() == data
    assert backend_bytes(table, "img.raw") == data
    assert os.stat(ro.path("s", "img.raw")).st_mode & 0o222 == 0
    # Where writes are allowed, O_RDONLY|O_TRUNC truncates, as Linux does on a local disk.
    os.close(os.open(w.path("s", "other.raw"), os.O_RDONLY | os.O_TRUNC))
    assert os.stat(w.path("s", "other.raw")).st_size == 0
    assert backend_bytes(table, "other.raw") == b""
