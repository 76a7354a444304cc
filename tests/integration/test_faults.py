"""Backend faults under a live mount: the real backend process is stopped (SIGSTOP) or killed
in the middle of a read and of a write made by real programs (``dd``), for S3 (radosgw), Swift
(swift-proxy), HTTP (nginx) and RBD (the OSD).

What must hold (doc/SEMANTICS.md, "Backend faults"):

* the reading ``dd`` gets EIO, and the writing ``dd`` fails (a write or its close reports
  EIO), within a deadline derived from the store's ``timeout`` (:func:`deadline`); no client
  stays in D state (an uninterruptible FUSE wait) past it;
* a second store of the same mount (a file store) keeps answering meanwhile;
* once the backend runs again (SIGCONT; after a kill, the daemon restarted) the same files read
  correctly through the same mount, without a remount, and the interrupted write published
  nothing: the name it was replacing still holds the old bytes, by the mount and by the
  backend's own client.

The backends are private to this module (one Ceph with radosgw on bluestore, so a killed OSD
restarts with its data; one Swift; one nginx), started once in parallel: a frozen or killed
daemon never disturbs the suite's shared set.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.backends import common, make, start_many, stop_order
from tests.backends.common import Backend, BackendError
from tests.backends.fixtures import (
    rados_connection,
    s3_client,
    unavailable,
    unique_name,
)
from tests.integration.test_model import backend_bytes
from tests.kinds.rbd import rbd_table
from tests.kinds.s3 import s3_table
from tests.kinds.swift import swift_table
from tests.mounting import Mount

MiB = 1 << 20
#: The stores' ``timeout``: every backend call is bounded by it.
TIMEOUT = 3.0
#: Image size: several cache blocks past what the kernel and imagefs read ahead (1 MiB each
#: here), and more than one S3 part and Swift segment, so the fault hits the middle of both.
SIZE = 12 * MiB


#: Slack on every deadline, for the machine (two cores, shared with other Ceph clusters).
SLACK = 5.0


def deadline(attempts: int) -> float:
    """How long a client may wait for its error once the backend stopped answering.

    The longest one backend request may take is the store's ``timeout`` for each of its
    *attempts* (retries + 1), and imagefs waits one more timeout before it gives up on an
    upload's requests in flight. A client waits for no more than that: its read's fetch or
    its close's upload fails, and it gets EIO. Cleaning up after the failure (aborting the
    upload, deleting its parts) is not the client's wait: the next mount removes what that
    leaves. Plus :data:`SLACK`."""
    return TIMEOUT * (attempts + 1) + SLACK


# ------------------------------------------------------------------------------- backends
@pytest.fixture(scope="module")
def private() -> Iterator[dict[str, Backend]]:
    """This module's own Ceph (radosgw, bluestore), Swift and nginx, started in parallel."""
    root = common.make_scratch()
    backends = {"ceph": make("ceph", root, "bluestore"), "swift": make("swift", root),
                "nginx": make("nginx", root)}
    errors = start_many(list(backends.values()))
    try:
        for name, e in errors.items():
            unavailable(name, e if isinstance(e, BackendError) else BackendError(repr(e)))
        yield backends
    finally:
        for group in stop_order([b for n, b in backends.items() if n not in errors]):
            for b in group:
                b.stop()
        common.remove_tree(root)


@dataclass
class Case:
    """One store kind on a private backend, and the daemon whose fault it must survive."""

    kind: str
    backend: Backend
    daemon: str
    table: dict[str, Any]
    #: Tries of one backend request the store's config allows (retries + 1).
    attempts: int = 1
    #: Publish an image without imagefs (HTTP: files under nginx's root).
    put: Callable[[str, bytes], None] | None = None

    @property
    def deadline(self) -> float:
        return deadline(self.attempts)

    @property
    def writable(self) -> bool:
        return self.kind != "http"

    def backend_bytes(self, name: str) -> bytes:
        """The image as the backend's own client reads it (http: the served file)."""
        if self.kind == "http":
            return (Path(self.table["_root"]) / name).read_bytes()
        return backend_bytes(self.table, name)


@pytest.fixture(params=["s3", "swift", "http", "rbd"])
def case(request: pytest.FixtureRequest, private: dict[str, Backend],
         tmp_path: Path) -> Iterator[Case]:
    kind = request.param
    # Nothing is removed afterwards: the private backends go at the end of the module.
    if kind == "s3":
        ceph = private["ceph"].info
        s3 = s3_client(ceph)
        bucket = unique_name("t-")
        s3.create_bucket(Bucket=bucket)
        yield Case(kind, private["ceph"], "rgw.gw",
                   s3_table(ceph, bucket, tmp_path, timeout=TIMEOUT, max_attempts=3), attempts=3)
    elif kind == "rbd":
        import rbd

        ceph = private["ceph"].info
        pool = unique_name()
        with rados_connection(ceph) as cluster:
            cluster.create_pool(pool)
            with cluster.open_ioctx(pool) as ioctx:
                rbd.RBD().pool_init(ioctx, True)
        yield Case(kind, private["ceph"], "osd.0", rbd_table(ceph, pool, timeout=TIMEOUT))
    elif kind == "swift":
        sw = private["swift"].info
        key = tmp_path / "swift.key"
        key.write_text(sw.key + "\n")
        key.chmod(0o600)
        container = unique_name("t-")
        yield Case(kind, private["swift"], "proxy",
                   swift_table(sw.auth_url, sw.user, str(key), container, timeout=TIMEOUT,
                               retries=1), attempts=2)
    else:
        ng = private["nginx"].info
        served = ng.root / tmp_path.name
        served.mkdir()

        def put(name: str, data: bytes) -> None:
            (served / name).write_bytes(data)

        yield Case(kind, private["nginx"], "nginx",
                   {"type": "http", "url": f"{ng.url}{tmp_path.name}/", "timeout": TIMEOUT,
                    "retries": 1, "_root": str(served)}, attempts=2, put=put)


def _mount_table(case: Case) -> dict[str, Any]:
    return {k: v for k, v in case.table.items() if not k.startswith("_")}


# ------------------------------------------------------------------------------- clients
def pattern(size: int, seed: str) -> bytes:
    block = hashlib.sha512(seed.encode()).digest() * (MiB // 64)
    return b"".join(hashlib.sha256(f"{seed}{i}".encode()).digest() + block[32:]
                    for i in range(size // MiB))[:size]


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def proc_state(pid: int) -> str:
    """The one-letter state in /proc/PID/stat ('D': uninterruptible wait), '' once gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[0]


class Client:
    """A ``dd`` reading an image into a pipe we drain, or writing one from a pipe we fill, so
    the test decides when its next backend request happens: after the fault."""

    def __init__(self, argv: list[str], feed: bytes | None = None) -> None:
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE if feed is not None else None,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out = bytearray()
        self.ended: float | None = None
        self.states: set[str] = set()
        self._feed = feed
        self._fed = 0

    @classmethod
    def reader(cls, path: Path) -> Client:
        return cls(["dd", f"if={path}", "bs=1M", "status=none"])

    @classmethod
    def writer(cls, path: Path, data: bytes) -> Client:
        return cls(["dd", f"of={path}", "bs=1M", "iflag=fullblock", "status=none"], data)

    def start_feeding(self, upto: int) -> None:
        """Write the first ``upto`` bytes into the writer's pipe (dd writes them on)."""
        assert self.p.stdin is not None and self._feed is not None
        self.p.stdin.write(self._feed[:upto])
        self.p.stdin.flush()
        self._fed = upto

    def go_on(self) -> None:
        """Let the client continue past the fault: drain the reader, feed the writer the
        rest. In threads: either may block until imagefs answers."""
        if self._feed is not None:
            feed = self._feed

            def rest() -> None:
                assert self.p.stdin is not None
                try:
                    self.p.stdin.write(feed[self._fed:])
                    self.p.stdin.close()
                except (BrokenPipeError, OSError):
                    pass
            threading.Thread(target=rest, daemon=True).start()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.p.stdout is not None
        while chunk := self.p.stdout.read(65536):
            self.out += chunk

    def poll(self) -> bool:
        """True once it has exited; records its state meanwhile."""
        if self.ended is None:
            self.states.add(proc_state(self.p.pid))
            if self.p.poll() is not None:
                self.ended = time.monotonic()
        return self.ended is not None

    def error(self) -> str:
        assert self.p.stderr is not None
        return self.p.stderr.read().decode(errors="replace")


def wait_all(clients: list[Client], until: float) -> None:
    while not all(c.poll() for c in clients) and time.monotonic() < until:
        time.sleep(0.05)


def file_store_answers(m: Mount, tag: str) -> float:
    """Write, list and read back an image in the file store; returns how long it took. Runs
    in a child with a hard limit, so a mount that stalls fails the test instead of hanging."""
    script = ("import os, sys\n"
              "p = os.path.join(sys.argv[1], sys.argv[2])\n"
              "data = os.urandom(1 << 20)\n"
              "open(p, 'wb').write(data)\n"
              "assert sys.argv[2] in os.listdir(sys.argv[1])\n"
              "assert open(p, 'rb').read() == data\n")
    t0 = time.monotonic()
    r = subprocess.run(["python3", "-c", script, str(m.path("local")), f"{tag}.raw"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return time.monotonic() - t0


# ------------------------------------------------------------------------------- the test
def _prepare(case: Case, m: Mount) -> tuple[bytes, bytes]:
    """Publish ``a.raw`` (to be read) and ``b.raw`` (to be replaced) and read both once."""
    a, b = pattern(SIZE, "a"), pattern(SIZE, "b")
    for name, data in (("a.raw", a), ("b.raw", b)):
        if case.put is not None:
            case.put(name, data)
        else:
            m.path("s", name).write_bytes(data)
    assert sorted(os.listdir(m.path("s"))) == ["a.raw", "b.raw"]
    return a, b


@pytest.mark.parametrize("fault", ["stop", "kill"])
def test_backend_fault_under_reader_and_writer(case: Case, fault: str, mount_factory: Any,
                                               tmp_path: Path) -> None:
    local = tmp_path / "local-store"
    local.mkdir()
    # Small read-ahead so most blocks are still to be fetched when the fault comes.
    m = mount_factory({"s": _mount_table(case), "local": {"type": "file", "path": str(local)}},
                      cache={"readahead": "1MiB", "fetch_size": "1MiB"}, metadata_ttl=0)
    a, b = _prepare(case, m)
    new = pattern(SIZE, "new")
    reader = Client.reader(m.path("s", "a.raw"))
    # dd has read its first MiB and waits for us to drain the pipe.
    time.sleep(0.5)
    clients = [reader]
    writer = None
    if case.writable:
        writer = Client.writer(m.path("s", "b.raw"), new)
        writer.start_feeding(5 * MiB)
        time.sleep(1.0)  # streamed/written on to the backend before the fault
        clients.append(writer)

    timings: dict[str, float] = {}

    def after_fault() -> None:
        t0 = time.monotonic()
        for c in clients:
            c.go_on()
        timings["file store"] = file_store_answers(m, f"during-{fault}")
        wait_all(clients, t0 + case.deadline)
        for c in clients:
            name = "read" if c is reader else "write"
            timings[name] = (c.ended or time.monotonic()) - t0
            if not c.poll():
                state = proc_state(c.p.pid)
                c.p.kill()
                pytest.fail(f"{case.kind} {fault}: the {name} client did not end within "
                            f"{case.deadline:.0f}s (state {state!r})")

    if fault == "stop":
        with case.backend.frozen(case.daemon):
            after_fault()
    else:
        case.backend.kill(case.daemon)
        try:
            after_fault()
        finally:
            case.backend.restart(case.daemon)
    states = {("read" if c is reader else "write"): "".join(sorted(c.states - {""}))
              for c in clients}
    print(f"{case.kind} {fault} {case.daemon}: " +
          ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()) + f"; states seen {states}")

    # The reader got EIO, not a short file; the writer failed, not a success.
    err = reader.error()
    assert reader.p.returncode != 0 and "Input/output error" in err, \
        f"reader: exit {reader.p.returncode}: {err}"
    assert bytes(reader.out) == a[:len(reader.out)], "the reader got bytes that are not a.raw"
    assert len(reader.out) < SIZE
    # The file store answered before the faulty store's timeouts ran out (it does not wait
    # for them: its own calls take a fraction of a second).
    assert timings["file store"] < TIMEOUT, timings
    if writer is not None:
        werr = writer.error()
        assert writer.p.returncode != 0 and "Input/output error" in werr, \
            f"writer: exit {writer.p.returncode}: {werr}"

    # Back to normal, same mount: the images read whole, the interrupted write published
    # nothing (b.raw is the old image, by the mount and by the backend's own client).
    assert digest(m.path("s", "a.raw").read_bytes()) == digest(a)
    assert digest(m.path("s", "b.raw").read_bytes()) == digest(b)
    assert sorted(os.listdir(m.path("s"))) == ["a.raw", "b.raw"]
    assert digest(case.backend_bytes("b.raw")) == digest(b)
    if case.writable:  # and the store takes writes again
        m.path("s", "c.raw").write_bytes(new)
        assert digest(m.path("s", "c.raw").read_bytes()) == digest(new)
        assert digest(case.backend_bytes("c.raw")) == digest(new)
