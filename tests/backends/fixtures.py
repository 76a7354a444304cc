"""pytest fixtures giving tests real backends: two Ceph clusters, Swift, nginx, Cinder.

``tests/conftest.py`` does ``from tests.backends.fixtures import *`` (``__all__`` below).

Session fixtures ``ceph``, ``ceph2``, ``swift``, ``nginx``, ``cinder`` yield the backend's
info object (see ceph.CephInfo, swift.SwiftInfo, nginx.NginxInfo, cinder.CinderInfo).
Function fixtures ``rbd_pool``, ``rbd_pool2``, ``s3_bucket``, ``swift_container``,
``rgw_swift_container`` yield a fresh, uniquely named pool/bucket/container name and remove it
(with its contents) afterwards; ``cinder_project`` a fresh Cinder project (a CinderProject)
whose volumes are deleted afterwards.

Start-up is lazy: nothing starts until a test needs a backend. At that moment every backend
that some selected test needs is started in the background, in parallel, so the rest are
usually up before they are asked for; a backend no selected test needs never starts. A
failure is remembered, so a broken backend costs one attempt, not one per test.

A backend that cannot start makes its tests skip with a message saying what to install,
unless ``CI`` is set (non-empty): then they fail, with the log tails, so CI never passes by
skipping. After each test using a function fixture the backend's daemons are checked to
still be alive, so a daemon crash is reported at the test that caused it.

``IMAGEFS_USE_BACKENDS=DIR`` makes the fixtures use a set started by hand with
``python -m tests.backends up --detach --dir DIR`` (no start-up wait) instead. Several sets may
be named, ``DIR1:DIR2`` (the first to have a backend provides it); a backend none of them has
is started as usual, on the reused ones it needs (Cinder on a reused Ceph).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.backends import (
    NAMES,
    common,
    info_from_state,
    make,
    packages,
    read_state,
    stop_order,
    with_needs,
)
from tests.backends.ceph import CephInfo
from tests.backends.cinder import CinderInfo, CinderProject, new_project_id
from tests.backends.common import Backend, BackendError, BackendMissing
from tests.backends.nginx import NginxInfo
from tests.backends.swift import SwiftInfo

__all__ = [
    "backend_manager",
    "ceph",
    "ceph2",
    "swift",
    "nginx",
    "cinder",
    "cinder_project",
    "rbd_pool",
    "rbd_pool2",
    "s3_bucket",
    "swift_container",
    "rgw_swift_container",
]

REUSE_ENV = "IMAGEFS_USE_BACKENDS"


class BackendManager:
    """Starts backends once, in the background, and stops them all at the end of the run."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.root: Path | None = None
        self._pool = ThreadPoolExecutor(max_workers=len(NAMES), thread_name_prefix="backend")
        self._futures: dict[str, Future[Backend]] = {}
        self._reported: set[str] = set()
        self._t0 = 0.0
        self._ready_after: dict[str, float] = {}  # seconds from the first request
        self._reused: dict[str, Any] = {}
        for reuse in (os.environ.get(REUSE_ENV) or "").split(os.pathsep):
            if not reuse:
                continue
            try:
                state = read_state(Path(reuse))
            except (OSError, ValueError) as e:
                raise pytest.UsageError(
                    f"{REUSE_ENV}={reuse}, but its state file is unreadable ({e}): unset it, "
                    f"or start a set with `python -m tests.backends up --detach --dir {reuse}`"
                ) from None
            for n, entry in state["backends"].items():
                self._reused.setdefault(n, info_from_state(n, entry))

    def _resolve(self, name: str) -> Any:
        """A dependency's info object, waiting for its start-up (see Backend.needs)."""
        if name in self._reused:
            return self._reused[name]
        return self._futures[name].result().info

    def _start(self, name: str) -> Backend:
        assert self.root is not None
        backend = make(name, self.root)
        backend.resolve = self._resolve
        backend.start()
        self._ready_after[name] = time.monotonic() - self._t0
        return backend

    def prestart(self, names: set[str]) -> None:
        """Begin starting *names* (those not started or reused yet) in parallel threads."""
        names = with_needs(names)  # dependencies first: NAMES lists them before their users
        todo = [n for n in NAMES if n in names and n not in self._futures and n not in self._reused]
        if not todo:
            return
        if self.root is None:
            self._t0 = time.monotonic()
            common.install_cleanup_hooks()
            common.reap_orphans()
            self.root = common.make_scratch()
        for n in todo:
            self._futures[n] = self._pool.submit(self._start, n)

    def get(self, name: str, request: pytest.FixtureRequest) -> Any:
        """The info object of backend *name*; skips or fails the test if it cannot start."""
        if name in self._reused:
            return self._reused[name]
        items = getattr(request.session, "items", None) or []
        wanted = {n for item in items for n in getattr(item, "fixturenames", ()) if n in NAMES}
        self.prestart(wanted | {name})
        try:
            return self._futures[name].result().info
        except Exception as e:  # reported outside the handler: no "during handling..." chain
            error = e if isinstance(e, BackendError) else BackendError(f"{name}: {e!r}")
        if name not in self._reported:  # the whole story once, not once per test
            self._reported.add(name)
            common.log(f"backend {name} failed:\n{error}")
        unavailable(name, error)

    def check(self, name: str) -> None:
        """Fail the current test (teardown) if one of *name*'s daemons has died."""
        fut = self._futures.get(name)
        if fut is None or not fut.done() or fut.exception() is not None:
            return
        try:
            fut.result().check()
            return
        except BackendError as e:
            error = e
        pytest.fail(f"backend daemon died during the test:\n{error}", pytrace=False)

    @contextmanager
    def teardown(self, name: str) -> Iterator[None]:
        """Around a fixture's clean-up: if a daemon of *name* died, report that rather than
        (or instead of) the clean-up's own error, which would only be its consequence."""
        self.check(name)
        try:
            yield
        except Exception:
            self.check(name)
            raise

    def close(self) -> None:
        """Stop every backend (each in its own order, all in parallel); remove the scratch dir."""
        backends = []
        for fut in self._futures.values():
            try:
                backends.append(fut.result())
            except BaseException:  # its start-up already cleaned up after itself and reported
                pass
        for group in stop_order(backends):
            list(self._pool.map(lambda b: b.stop(), group))
        self._pool.shutdown()
        if backends:
            self._report_timings(backends)
        if self.root is not None:
            common.remove_tree(self.root)

    def _report_timings(self, backends: list[Backend]) -> None:
        """One line on the terminal (past output capture): each start-up time, and when the
        last backend was ready counted from the first request (they start in parallel)."""
        each = ", ".join(f"{b.name} up in {b.startup_seconds or 0:.1f}s" for b in backends)
        line = f"imagefs backends: {each}; all ready {max(self._ready_after.values()):.1f}s"
        line += " after the first request"
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        capture = self.config.pluginmanager.get_plugin("capturemanager")
        if reporter is None or capture is None:
            common.log(line)
            return
        with capture.global_and_fixture_disabled():  # runs mid-line: the last test's teardown
            reporter.write("\n")
            reporter.write_line(line)


def unavailable(name: str, error: BackendError) -> NoReturn:
    """Skip (developer machine) or fail (``CI`` set) a test whose backend did not start."""
    if os.environ.get("CI"):
        pytest.fail(
            f"backend {name!r} did not start, and CI is set so this fails rather than skips:\n"
            f"{error}",
            pytrace=False,
        )
    first = str(error).splitlines()[0]
    if isinstance(error, BackendMissing):  # its text says what to install
        pytest.skip(f"backend {name!r} unavailable: {first}")
    pytest.skip(
        f"backend {name!r} failed to start: {first} -- its packages: "
        f"apt-get install {packages(name)}; log tails are on stderr (pytest -s)"
    )


# --- session fixtures: the backends ---------------------------------------------------------


@pytest.fixture(scope="session")
def backend_manager(pytestconfig: pytest.Config) -> Iterator[BackendManager]:
    """The one manager of this run; its teardown stops whatever was started."""
    manager = BackendManager(pytestconfig)
    try:
        yield manager
    finally:
        manager.close()
        common.cleanup()  # anything left over (normally nothing)


@pytest.fixture(scope="session")
def ceph(backend_manager: BackendManager, request: pytest.FixtureRequest) -> CephInfo:
    """Ceph cluster with radosgw (S3 + Swift APIs): a ceph.CephInfo."""
    return backend_manager.get("ceph", request)


@pytest.fixture(scope="session")
def ceph2(backend_manager: BackendManager, request: pytest.FixtureRequest) -> CephInfo:
    """A second, independent Ceph cluster (no radosgw): a ceph.CephInfo."""
    return backend_manager.get("ceph2", request)


@pytest.fixture(scope="session")
def swift(backend_manager: BackendManager, request: pytest.FixtureRequest) -> SwiftInfo:
    """OpenStack Swift with tempauth, SLO and DLO: a swift.SwiftInfo."""
    return backend_manager.get("swift", request)


@pytest.fixture(scope="session")
def nginx(backend_manager: BackendManager, request: pytest.FixtureRequest) -> NginxInfo:
    """nginx serving ``root`` at ``url`` (ranges, JSON autoindex): an nginx.NginxInfo."""
    return backend_manager.get("nginx", request)


@pytest.fixture(scope="session")
def cinder(backend_manager: BackendManager, request: pytest.FixtureRequest) -> CinderInfo:
    """Cinder (noauth) with the RBD driver on a pool of ``ceph``: a cinder.CinderInfo."""
    return backend_manager.get("cinder", request)


# --- client handles the fixtures (and tests) use --------------------------------------------


def unique_name(prefix: str = "t") -> str:
    """A name no other test (or run against the same hand-started set) uses."""
    return f"{prefix}{uuid.uuid4().hex[:16]}"


@contextmanager
def rados_connection(info: CephInfo) -> Iterator[Any]:
    """A connected python-rados handle on cluster *info* as its cephx user."""
    import rados

    cluster = rados.Rados(conffile=info.conf, rados_id=info.user, conf={"keyring": info.keyring})
    cluster.conf_set("rados_mon_op_timeout", "30")
    cluster.connect()
    try:
        yield cluster
    finally:
        cluster.shutdown()


def s3_client(info: CephInfo) -> Any:
    """A boto3 S3 client for RGW of cluster *info* (path-style: there is no wildcard DNS)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=info.s3_endpoint,
        aws_access_key_id=info.s3_access_key,
        aws_secret_access_key=info.s3_secret_key,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
    )


def swift_connection(auth_url: str, user: str, key: str) -> Any:
    """A python-swiftclient connection (auth v1, as tempauth and RGW's swift_auth speak)."""
    from swiftclient.client import Connection

    return Connection(authurl=auth_url, user=user, key=key, auth_version="1", retries=2, timeout=60)


# --- function fixtures: fresh namespaces, removed afterwards --------------------------------


def _pool(info: CephInfo, manager: BackendManager, name: str) -> Iterator[str]:
    import rbd

    pool = unique_name()
    with rados_connection(info) as cluster:
        cluster.create_pool(pool)
        ioctx = cluster.open_ioctx(pool)
        try:
            rbd.RBD().pool_init(ioctx, True)
        finally:
            ioctx.close()
    yield pool
    with manager.teardown(name), rados_connection(info) as cluster:
        if cluster.pool_exists(pool):
            cluster.delete_pool(pool)


@pytest.fixture
def rbd_pool(ceph: CephInfo, backend_manager: BackendManager) -> Iterator[str]:
    """A new RADOS pool on ``ceph``, ``rbd pool init``-ed; deleted after the test."""
    yield from _pool(ceph, backend_manager, "ceph")


@pytest.fixture
def rbd_pool2(ceph2: CephInfo, backend_manager: BackendManager) -> Iterator[str]:
    """Like ``rbd_pool``, on ``ceph2``."""
    yield from _pool(ceph2, backend_manager, "ceph2")


def empty_and_delete_bucket(s3: Any, bucket: str) -> None:
    """Delete every object version, delete marker and multipart upload, then the bucket."""
    from botocore.exceptions import ClientError

    try:
        for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
            doomed = [
                {"Key": v["Key"], "VersionId": v["VersionId"]}
                for v in page.get("Versions", []) + page.get("DeleteMarkers", [])
            ]
            if doomed:
                s3.delete_objects(Bucket=bucket, Delete={"Objects": doomed, "Quiet": True})
        for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
            for up in page.get("Uploads", []):
                s3.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
        s3.delete_bucket(Bucket=bucket)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") != "NoSuchBucket":
            raise


@pytest.fixture
def s3_bucket(ceph: CephInfo, backend_manager: BackendManager) -> Iterator[str]:
    """A new, empty bucket on ``ceph``'s RGW; emptied (uploads aborted) and deleted after."""
    if not ceph.s3_endpoint:
        pytest.fail("the ceph backend has no RGW", pytrace=False)
    s3 = s3_client(ceph)
    bucket = unique_name("t-")
    s3.create_bucket(Bucket=bucket)
    yield bucket
    with backend_manager.teardown("ceph"):
        empty_and_delete_bucket(s3, bucket)


def delete_container(conn: Any, container: str) -> None:
    """Delete *container* and all its objects; a missing container is fine."""
    from swiftclient.exceptions import ClientException

    try:
        _, objects = conn.get_container(container, full_listing=True)
        for obj in objects:
            try:
                conn.delete_object(container, obj["name"])
            except ClientException as e:
                if e.http_status != 404:
                    raise
        conn.delete_container(container)
    except ClientException as e:
        if e.http_status != 404:
            raise


def _container(conn: Any, manager: BackendManager, backend: str) -> Iterator[str]:
    name = unique_name("t-")
    yield name
    with manager.teardown(backend):
        for c in (name, f"{name}_segments"):
            delete_container(conn, c)
    conn.close()


@pytest.fixture
def swift_container(swift: SwiftInfo, backend_manager: BackendManager) -> Iterator[str]:
    """A fresh container name on ``swift`` (not created); it and ``<name>_segments`` are
    deleted with their contents after the test."""
    conn = swift_connection(swift.auth_url, swift.user, swift.key)
    yield from _container(conn, backend_manager, "swift")


@pytest.fixture
def rgw_swift_container(ceph: CephInfo, backend_manager: BackendManager) -> Iterator[str]:
    """Like ``swift_container``, on ``ceph``'s RGW Swift API."""
    if not ceph.rgw_swift_auth_url:
        pytest.fail("the ceph backend has no RGW", pytrace=False)
    conn = swift_connection(
        ceph.rgw_swift_auth_url, str(ceph.rgw_swift_user), str(ceph.rgw_swift_key)
    )
    yield from _container(conn, backend_manager, "ceph")


@pytest.fixture
def cinder_project(cinder: CinderInfo, backend_manager: BackendManager) -> Iterator[CinderProject]:
    """A fresh Cinder project on ``cinder`` (noauth: any hex id is a project, quotas off), so
    a test sees only its own volumes; they are detached and deleted after the test."""
    project = CinderProject(cinder, new_project_id())
    yield project
    with backend_manager.teardown("cinder"):
        project.purge()

