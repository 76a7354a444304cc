"""A randomized model checker: sequences of file operations on one image, through two
processes and several descriptors at once, with renames (to a second name and back) and
unlinks among them, checked against what imagefs promises.

The model (doc/SEMANTICS.md): every descriptor open for writing on an image shares one pending
version; a descriptor open for reading sees the version published when it opened (or EIO once
that version is gone); the pending version becomes the published one when a process closes its
last descriptor open for writing; opening with O_TRUNC or shrinking below what a reader holds
may be refused with ETXTBSY. Every read is compared with the model, and after the last close
the image is compared byte for byte through the mount and with the backend's own client.

A seeded generator drives it; on failure the seed and a shrunk sequence are printed.
CI runs a short profile on every store kind; ``IMAGEFS_MODEL_OPS=10000`` runs a long one.
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.backends.fixtures import swift_connection

KIB = 1 << 10
MIB = 1 << 20
OPS = int(os.environ.get("IMAGEFS_MODEL_OPS", "120"))
SEED = int(os.environ.get("IMAGEFS_MODEL_SEED", "0")) or None

#: Runs in the second process: one JSON command per line in, one JSON answer per line out.
_WORKER = r"""
import json, os, sys
fds = {}
for line in sys.stdin:
    c = json.loads(line)
    try:
        op = c["op"]
        if op == "open":
            fds[c["fd"]] = os.open(c["path"], c["flags"], 0o644); out = None
        elif op == "close":
            os.close(fds.pop(c["fd"])); out = None
        elif op == "write":
            out = os.pwrite(fds[c["fd"]], bytes.fromhex(c["data"]), c["off"])
        elif op == "read":
            out = os.pread(fds[c["fd"]], c["size"], c["off"]).hex()
        elif op == "truncate":
            os.ftruncate(fds[c["fd"]], c["size"]); out = None
        elif op == "fsync":
            os.fsync(fds[c["fd"]]); out = None
        elif op == "rename":
            os.rename(c["path"], c["dst"]); out = None
        elif op == "unlink":
            os.unlink(c["path"]); out = None
        print(json.dumps({"ok": out}), flush=True)
    except OSError as e:
        print(json.dumps({"errno": e.errno}), flush=True)
"""


class Worker:
    """The second process: its descriptors are its own, as a second tool's would be."""

    def __init__(self) -> None:
        self.p = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)

    def call(self, **cmd: Any) -> Any:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        reply = json.loads(self.p.stdout.readline())
        if "errno" in reply:
            raise OSError(reply["errno"], os.strerror(reply["errno"]))
        return reply["ok"]

    def close(self) -> None:
        if self.p.stdin:
            self.p.stdin.close()
        self.p.wait(timeout=60)


class Local:
    """This process, with the same call interface."""

    def __init__(self) -> None:
        self.fds: dict[int, int] = {}

    def call(self, **c: Any) -> Any:
        op = c["op"]
        if op == "open":
            self.fds[c["fd"]] = os.open(c["path"], c["flags"], 0o644)
            return None
        if op == "rename":
            os.rename(c["path"], c["dst"])
            return None
        if op == "unlink":
            os.unlink(c["path"])
            return None
        fd = self.fds[c["fd"]]
        if op == "close":
            del self.fds[c["fd"]]
            os.close(fd)
            return None
        if op == "write":
            return os.pwrite(fd, bytes.fromhex(c["data"]), c["off"])
        if op == "read":
            return os.pread(fd, c["size"], c["off"]).hex()
        if op == "truncate":
            os.ftruncate(fd, c["size"])
            return None
        if op == "fsync":
            os.fsync(fd)
            return None
        raise AssertionError(op)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


@dataclass
class Desc:
    proc: int
    writing: bool
    #: For readers: the published bytes when it opened, and which publish that was.
    snapshot: bytes | None = None
    version: int = 0


@dataclass
class Model:
    published: bytes | None = None
    version: int = 0  # how many times it was published, renamed or deleted
    pending: bytearray | None = None
    descs: dict[int, Desc] = field(default_factory=dict)
    #: Which of the two names the image has (rename moves it to the other and back).
    name: int = 0
    #: The pending version changed since it was last published (imagefs's Writer.dirty):
    #: a rename by a process that is not writing it is then refused with EBUSY.
    dirty: bool = False
    #: Unlinked while descriptors were open: they go on on a file without a name, whose
    #: closes publish nothing; no new open until they are all closed (it would be a new file).
    orphan: bool = False

    def procs_writing(self) -> set[int]:
        return {d.proc for d in self.descs.values() if d.writing}

    def writers(self, proc: int | None = None) -> list[int]:
        return [k for k, d in self.descs.items() if d.writing and (proc is None or d.proc == proc)]

    def readers(self) -> list[int]:
        return [k for k, d in self.descs.items() if not d.writing]


def _gen(rng: random.Random, n: int) -> list[dict[str, Any]]:
    """Operations with descriptor numbers; whether each is valid is decided when it runs."""
    ops = []
    for _ in range(n):
        kind = rng.choices(["open_w", "open_trunc", "open_r", "write", "seqwrite", "truncate",
                            "read", "fsync", "close", "rename", "unlink"],
                           [6, 1, 3, 10, 6, 3, 8, 1, 7, 2, 1])[0]
        ops.append({"kind": kind, "proc": rng.randrange(2), "pick": rng.randrange(1 << 30),
                    "off": rng.randrange(0, 3 * MIB), "len": rng.randrange(1, 300 * KIB),
                    "seed": rng.randrange(1 << 30)})
    return ops


class Failure(AssertionError):
    pass


def _execute(paths: tuple[Path, Path], ops: list[dict[str, Any]], log: list[str]) -> Model:
    """Run ``ops`` on an image that moves between ``paths`` (two new names) and check each
    step against the model."""
    procs = [Local(), Worker()]
    m = Model()
    next_fd = 0
    try:
        for op in ops:
            kind, proc = op["kind"], procs[op["proc"]]
            mine = [k for k, d in m.descs.items() if d.proc == op["proc"]]
            path = paths[m.name]
            if m.orphan and kind in ("open_w", "open_trunc", "open_r", "rename", "unlink"):
                continue
            if kind in ("rename", "unlink"):
                _namespace(kind, op["proc"], proc, paths, m, log)
            elif kind in ("open_w", "open_trunc"):
                flags = os.O_RDWR | os.O_CREAT | (os.O_TRUNC if kind == "open_trunc" else 0)
                try:
                    proc.call(op="open", fd=next_fd, path=str(path), flags=flags)
                except OSError as e:
                    if e.errno == errno.ETXTBSY and kind == "open_trunc" and m.readers():
                        log.append(f"{kind} p{op['proc']} -> ETXTBSY")
                        continue
                    raise Failure(f"{kind}: {e}") from None
                if not m.writers():
                    m.pending = bytearray(m.published or b"")
                    m.dirty = m.published is None  # a new image: pending until published
                if kind == "open_trunc":
                    assert m.pending is not None
                    m.pending.clear()
                    m.dirty = True
                m.descs[next_fd] = Desc(op["proc"], True)
                log.append(f"{kind} p{op['proc']} fd{next_fd}")
                next_fd += 1
            elif kind == "open_r":
                if m.published is None and not m.writers():
                    continue  # nothing to open
                if m.published is None:
                    continue  # a new image is invisible to other opens until published
                proc.call(op="open", fd=next_fd, path=str(path), flags=os.O_RDONLY)
                m.descs[next_fd] = Desc(op["proc"], False, snapshot=m.published,
                                        version=m.version)
                log.append(f"open_r p{op['proc']} fd{next_fd}")
                next_fd += 1
            elif not mine:
                continue
            else:
                fd = mine[op["pick"] % len(mine)]
                d = m.descs[fd]
                _step(kind, op, proc, fd, d, m, log)
        for fd in list(m.descs):
            _step("close", {}, procs[m.descs[fd].proc], fd, m.descs[fd], m, log)
    finally:
        for p in procs:
            p.close()
    return m


def _step(kind: str, op: dict[str, Any], proc: Any, fd: int, d: Desc, m: Model,
          log: list[str]) -> None:
    if kind in ("write", "seqwrite") and d.writing:
        assert m.pending is not None
        off = len(m.pending) if kind == "seqwrite" else op["off"]
        data = random.Random(op["seed"]).randbytes(op["len"])
        try:
            proc.call(op="write", fd=fd, off=off, data=data.hex())
        except OSError as e:
            if e.errno == errno.EIO and m.orphan:
                log.append(f"write fd{fd} -> EIO (unlinked)")
                return
            raise Failure(f"write fd{fd} at {off}: {e}") from None
        if off > len(m.pending):
            m.pending.extend(bytes(off - len(m.pending)))
        m.pending[off:off + len(data)] = data
        m.dirty = True
        log.append(f"write fd{fd} {off}+{len(data)}")
    elif kind == "truncate" and d.writing:
        assert m.pending is not None
        size = op["off"]
        try:
            proc.call(op="truncate", fd=fd, size=size)
        except OSError as e:
            if e.errno == errno.ETXTBSY and m.readers():
                log.append(f"truncate fd{fd} {size} -> ETXTBSY")
                return
            if e.errno == errno.EIO and m.orphan:
                log.append(f"truncate fd{fd} {size} -> EIO (unlinked)")
                return
            raise Failure(f"truncate fd{fd} {size}: {e}") from None
        del m.pending[size:]
        m.pending.extend(bytes(size - len(m.pending)))
        m.dirty = True
        log.append(f"truncate fd{fd} {size}")
    elif kind == "read":
        want = bytes(m.pending) if d.writing else d.snapshot
        assert want is not None
        off = op["off"] % (len(want) + 1)
        try:
            got = bytes.fromhex(proc.call(op="read", fd=fd, off=off, size=op["len"]))
        except OSError as e:
            if e.errno == errno.EIO and not d.writing and d.version != m.version:
                log.append(f"read fd{fd} {off} -> EIO (its version was replaced)")
                return
            if e.errno == errno.EIO and d.writing and m.orphan:
                # Unlinked: the pending version may start from bytes that are gone.
                log.append(f"read fd{fd} {off} -> EIO (unlinked)")
                return
            raise Failure(f"read fd{fd} at {off}: {e}") from None
        log.append(f"read fd{fd} {off}+{op['len']}")
        expect = want[off:off + op["len"]]
        if (len(got) < len(expect) and got == expect[:len(got)] and not d.writing
                and d.version != m.version):
            # The kernel returns what it read before an error (POSIX short read): the bytes
            # must be the old version's, and the rest must then fail with EIO, not read as EOF.
            at = off + len(got)
            try:
                rest = proc.call(op="read", fd=fd, off=at, size=len(expect) - len(got))
            except OSError as e:
                if e.errno == errno.EIO:
                    log.append(f"read fd{fd} {at} -> EIO after a short read (version replaced)")
                    return
                raise Failure(f"read fd{fd} at {at}: {e}") from None
            raise Failure(f"read fd{fd} at {off}: short read of {len(got)}, then "
                          f"{len(bytes.fromhex(rest))} bytes instead of EIO")
        if got != expect:
            raise Failure(f"read fd{fd} at {off}: {len(got)} bytes differ from the model's "
                          f"{len(want[off:off + op['len']])}")
    elif kind == "fsync" and d.writing:
        try:
            proc.call(op="fsync", fd=fd)
        except OSError as e:
            if e.errno == errno.EIO and m.orphan:
                log.append(f"fsync fd{fd} -> EIO (unlinked)")
                return
            raise Failure(f"fsync fd{fd}: {e}") from None
        log.append(f"fsync fd{fd}")
    elif kind == "close":
        proc.call(op="close", fd=fd)
        del m.descs[fd]
        log.append(f"close fd{fd}")
        if d.writing and not m.writers(d.proc) and not m.orphan:
            assert m.pending is not None
            m.published = bytes(m.pending)
            m.version += 1
            m.dirty = False
        if not m.writers():
            m.pending = None
        if m.orphan and not m.descs:
            m.orphan = False  # the unnamed file is gone; the name is free


def _namespace(kind: str, p: int, proc: Any, paths: tuple[Path, Path], m: Model,
               log: list[str]) -> None:
    """rename (to the other name, or back) or unlink, by process ``p``.

    A new image that was never published is visible only to a process writing it: others
    get ENOENT. A rename of an image with changes pending is EBUSY unless ``p`` writes it;
    then its pending version is published first. An unlink leaves open descriptors on a file
    without a name: their closes publish nothing."""
    src, dst = paths[m.name], paths[1 - m.name]
    mine = p in m.procs_writing()
    expect = None
    if m.published is None and not mine:
        expect = errno.ENOENT  # nothing there, or someone else's unpublished new image
    elif kind == "rename" and m.dirty and m.published is not None and not mine:
        expect = errno.EBUSY
    try:
        if kind == "rename":
            proc.call(op="rename", path=str(src), dst=str(dst))
        else:
            proc.call(op="unlink", path=str(src))
    except OSError as e:
        if e.errno == expect:
            log.append(f"{kind} p{p} -> {errno.errorcode[e.errno]}")
            return
        raise Failure(f"{kind} p{p} {src.name}: {e} (expected "
                      f"{errno.errorcode.get(expect or 0, 'success')})") from None
    if expect is not None:
        raise Failure(f"{kind} p{p} {src.name}: succeeded, expected {errno.errorcode[expect]}")
    log.append(f"{kind} p{p} {src.name}")
    if kind == "rename":
        if m.dirty:  # p writes it: its pending version is published, then renamed
            assert m.pending is not None
            m.published = bytes(m.pending)
            m.version += 1
            m.dirty = False
        m.name = 1 - m.name
        m.version += 1  # a new object on some stores (S3 copies): old readers may get EIO
        return
    m.published = None
    m.version += 1
    m.orphan = bool(m.descs)
    if not m.descs:
        m.pending = None


# ---------------------------------------------------------------------------------- backends
def backend_bytes(table: dict[str, Any], name: str) -> bytes:
    """The image as the backend's own client reads it."""
    t = table["type"]
    if t == "file":
        return (Path(table["path"]) / name).read_bytes()
    if t == "s3":
        import boto3
        from botocore.config import Config

        secret = Path(table["secret_access_key_file"]).read_text().strip()
        s3 = boto3.client("s3", endpoint_url=table["endpoint_url"], region_name="us-east-1",
                          aws_access_key_id=table["access_key_id"],
                          aws_secret_access_key=secret,
                          config=Config(s3={"addressing_style": "path"}))
        return s3.get_object(Bucket=table["bucket"], Key=name)["Body"].read()
    if t == "rbd":
        import rados
        import rbd

        with rados.Rados(conffile=table["conf"], rados_id=table["user"],
                         conf={"keyring": table["keyring"]}) as cluster:
            with cluster.open_ioctx(table["pool"]) as io, rbd.Image(io, name,
                                                                    read_only=True) as img:
                return img.read(0, img.size()) if img.size() else b""
    if t == "swift":
        conn = swift_connection(table["auth_url"], table["user"],
                                Path(table["key_file"]).read_text().strip())
        try:
            return conn.get_object(table["container"], name)[1]
        finally:
            conn.close()
    if t == "cinder":  # the volume's RBD image, image_size bytes of it (Cinder's own record)
        import rados
        import rbd

        from tests.backends.cinder import api_get

        url = f"{table['endpoint']}/{table['project_id']}"
        vols = api_get(f"{url}/volumes/detail?name={name}",
                       f"{table['user_id']}:{table['project_id']}")["volumes"]
        (v,) = [v for v in vols if v["status"] not in ("deleting", "error_deleting")]
        size = int(v["metadata"]["image_size"])
        with rados.Rados(conffile=table["ceph_conf"], rados_id=table["ceph_user"],
                         conf={"keyring": table["ceph_keyring"]}) as cluster:
            with cluster.open_ioctx(table["rbd_pool"]) as io, \
                    rbd.Image(io, f"volume-{v['id']}", read_only=True) as img:
                return img.read(0, size) if size else b""
    raise AssertionError(t)


def _check_published(m: Any, table: dict[str, Any], names: tuple[str, str],
                     model: Model) -> None:
    name = names[model.name]
    path = m.path("s", name)
    assert not m.path("s", names[1 - model.name]).exists(), "the image's other name exists"
    if model.published is None:
        assert not path.exists()
        return
    assert path.read_bytes() == model.published, "the mount shows other bytes than the model"
    assert backend_bytes(table, name) == model.published, "the backend holds other bytes"


# ---------------------------------------------------------------------------------- the test
@pytest.mark.parametrize("run", range(2))
def test_random_operation_sequences_match_the_model(store_table: dict[str, Any],
                                                    mount_factory: Any, run: int) -> None:
    seed = SEED or random.SystemRandom().randrange(1 << 31)
    rng = random.Random(seed + run)
    ops = _gen(rng, OPS)
    m = mount_factory({"s": store_table})
    attempt = 0

    def attempt_ok(candidate: list[dict[str, Any]], log: list[str]) -> str | None:
        nonlocal attempt
        attempt += 1
        names = (f"model-{run}-{attempt}.raw", f"model-{run}-{attempt}-moved.raw")
        try:
            model = _execute((m.path("s", names[0]), m.path("s", names[1])), candidate, log)
            _check_published(m, store_table, names, model)
        except (Failure, AssertionError, OSError) as e:
            return f"{type(e).__name__}: {e}"
        return None

    log: list[str] = []
    error = attempt_ok(ops, log)
    if error is None:
        return
    # Shrink: drop chunks of operations while the failure stays (bounded effort).
    best, best_log, best_error, chunk = ops, log, error, max(1, len(ops) // 2)
    while chunk >= 1 and attempt < 60:
        i, shrunk = 0, False
        while i < len(best) and attempt < 60:
            candidate = best[:i] + best[i + chunk:]
            cand_log: list[str] = []
            if candidate and (cand_error := attempt_ok(candidate, cand_log)) is not None:
                best, best_log, best_error, shrunk = candidate, cand_log, cand_error, True
            else:
                i += chunk
        chunk = chunk // 2 if not shrunk else chunk
    pytest.fail(f"seed {seed + run} ({store_table['type']}): {error}\n"
                f"shrunk to {len(best)} operations, failing with {best_error}:\n  "
                + "\n  ".join(best_log))


def test_another_processs_lookup_does_not_make_a_dup_close_publish(
        file_store_table: dict[str, Any], mount_factory: Any) -> None:
    """Found by the model checker: another process's lookup of a new, unpublished image gets
    ENOENT, and the kernel drops the writer's dentry (its descriptors then read as
    "PATH (deleted)" in /proc, under the name they were opened with, also after a rename).
    Closing one of the writer's descriptors then published its half-written image, since the
    check for another descriptor of the same process compared paths."""
    m = mount_factory({"s": file_store_table})
    path, moved = str(m.path("s", "new.raw")), str(m.path("s", "moved.raw"))
    store = Path(file_store_table["path"])
    writer, other = Worker(), Local()
    try:
        rw = os.O_RDWR | os.O_CREAT
        for fd in (0, 1, 4):
            writer.call(op="open", fd=fd, path=path, flags=rw)
        other.call(op="open", fd=2, path=path, flags=rw | os.O_TRUNC)  # looks it up first
        other.call(op="close", fd=2)  # its last close: publishes the empty image
        writer.call(op="write", fd=0, off=0, data=(b"w" * 68722).hex())
        writer.call(op="close", fd=1)  # the writer still holds fd 0: nothing to publish
        assert os.stat(store / "new.raw").st_size == 0
        writer.call(op="open", fd=3, path=path, flags=os.O_RDONLY)
        assert writer.call(op="read", fd=3, off=0, size=MIB) == ""
        writer.call(op="close", fd=3)
        writer.call(op="rename", path=path, dst=moved)  # the writer's rename publishes
        assert os.stat(store / "moved.raw").st_size == 68722
        writer.call(op="write", fd=0, off=68722, data=(b"v" * 1000).hex())
        writer.call(op="close", fd=4)  # still fd 0, opened under the old name: no publish
        assert os.stat(store / "moved.raw").st_size == 68722
        writer.call(op="close", fd=0)
        assert os.stat(store / "moved.raw").st_size == 69722
    finally:
        writer.close()
        other.close()
