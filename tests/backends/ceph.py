"""A throw-away Ceph cluster (one mon, one OSD, optional radosgw) under one scratch directory.

Why it is built this way (facts measured on the project's machines, see shared/BACKENDS.md):

* memstore by default: nothing to mkfs, up in about a second; ``osd max object size`` and
  ``memstore device bytes`` are raised because the defaults (128 MiB, 1 GiB) make big writes
  fail with EFBIG or hang once the store is "full". ``objectstore="bluestore"`` puts the OSD
  on a sparse file instead, for data that should not live in RAM.
* ``paxos propose interval`` lowered: each pool creation is an osdmap epoch, and the default
  1 s batching made radosgw take 15 s to come up.
* No mgr: nothing here needs cluster statistics, and it costs about 300 MB.
* Every daemon runs with ``-f`` as our child (see common.Daemon); pid files and admin sockets
  are set per daemon section so clients do not fight over one socket; all paths, keyring and
  conf live in the scratch dir and nothing is written to /etc.
* One keyring holds every entity; ``ceph-mon --mkfs`` imports it, so no ``ceph auth add``.
* Mon commands go through python-rados in this process, not the ``ceph`` CLI, which costs a
  Python start-up per call.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import struct
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.backends.common import (
    HOST,
    Backend,
    BackendError,
    BackendMissing,
    free_ports,
    http_status,
    require,
    run,
    tail_logs,
    wait_until,
)

PACKAGES = "ceph-mon ceph-osd ceph-common radosgw python3-rados python3-rbd"
RGW_UID = "imagefs"
RGW_SWIFT_USER = f"{RGW_UID}:swift"
GiB = 1 << 30


@dataclass
class CephInfo:
    """What a test needs to reach a cluster (the ``ceph``/``ceph2`` fixture value)."""

    dir: Path
    conf: str
    keyring: str
    fsid: str
    user: str = "admin"
    s3_endpoint: str | None = None
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    rgw_swift_auth_url: str | None = None
    rgw_swift_user: str | None = None
    rgw_swift_key: str | None = None

    def log_tail(self, lines: int = 30) -> str:
        """Tails of the daemons' logs, to attach to a failure message."""
        return tail_logs(self.dir / "log", lines)


def cephx_key() -> str:
    """A new cephx secret as keyrings spell it: the encoded CryptoKey, base64.

    Encoding: u16 type (1 = AES), u32 seconds + u32 nanoseconds created, u16 length, 16 bytes.
    Made here rather than by five ``ceph-authtool`` runs.
    """
    raw = struct.pack("<HIIH", 1, int(time.time()), 0, 16) + secrets.token_bytes(16)
    return base64.b64encode(raw).decode()


KEYRING_ENTITIES: dict[str, dict[str, str]] = {
    "mon.": {"mon": "allow *"},
    "client.admin": {"mon": "allow *", "osd": "allow *", "mgr": "allow *", "mds": "allow *"},
    "osd.0": {"mon": "allow profile osd", "mgr": "allow profile osd", "osd": "allow *"},
    "client.rgw.gw": {"mon": "allow rw", "osd": "allow rwx", "mgr": "allow rw"},
}


def keyring_text() -> str:
    parts = []
    for entity, caps in KEYRING_ENTITIES.items():
        lines = [f"[{entity}]", f"\tkey = {cephx_key()}"]
        lines += [f'\tcaps {kind} = "{cap}"' for kind, cap in caps.items()]
        parts.append("\n".join(lines))
    return "\n".join(parts) + "\n"


def daemon_section(d: Path, name: str, extra: str) -> str:
    """pid file / admin socket / log only per daemon section (not [global]): see module doc."""
    return f"""
[{name}]
pid file = {d}/run/$name.pid
admin socket = {d}/run/$name.asok
log file = {d}/log/$name.log
{extra}"""


class CephCluster(Backend):
    """One mon + one OSD (+ radosgw with an S3 user and a Swift subuser when ``rgw``).

    Daemons start in the order mon, OSD, radosgw, so the inherited ordered stop ends radosgw
    first (it talks to RADOS while shutting down), then the OSD, then the mon.
    """

    packages = PACKAGES

    def __init__(
        self, directory: Path, name: str = "ceph", rgw: bool = True, objectstore: str = "memstore"
    ) -> None:
        super().__init__(directory)
        self.name = name
        self.rgw = rgw
        if objectstore not in ("memstore", "bluestore"):
            raise ValueError(f"objectstore must be memstore or bluestore, not {objectstore!r}")
        self.objectstore = objectstore
        self.conf = directory / "ceph.conf"
        self.keyring = directory / "keyring"
        self.fsid = str(uuid.uuid4())
        self.s3_access_key = "T" + secrets.token_hex(10).upper()[:19]
        self.s3_secret_key = secrets.token_urlsafe(30)
        self.swift_key = secrets.token_urlsafe(18)
        self.mon_ports: list[int] = []
        self.rgw_port: int | None = None

    # -- configuration ----------------------------------------------------------------------

    def _store_conf(self) -> str:
        if self.objectstore == "memstore":
            return f"osd objectstore = memstore\nmemstore device bytes = {16 * GiB}"
        return (
            "osd objectstore = bluestore\n"
            "bluestore block create = true\n"
            f"bluestore block size = {16 * GiB}\n"
            "bluestore block db create = false\n"
            "bluestore block wal create = false\n"
            "bluestore fsck on mount = false\n"
            f"osd memory target = {GiB}"
        )

    def _conf_text(self) -> str:
        d = self.dir
        v2, v1 = self.mon_ports
        text = f"""[global]
fsid = {self.fsid}
mon host = [v2:{HOST}:{v2},v1:{HOST}:{v1}]
public addr = {HOST}
cluster addr = {HOST}
ms bind ipv6 = false
run dir = {d}/run
crash dir = {d}/crash
keyring = {self.keyring}
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
osd crush chooseleaf type = 0
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
osd max object size = {GiB}
"""
        text += daemon_section(
            d,
            "mon",
            f"mon data = {d}/mon\n"
            "paxos propose interval = 0.01\n"
            "paxos min wait = 0.001\n"
            f"mon cluster log file = {d}/log/cluster.log\n"
            "mon data avail crit = 0\n"
            "mon data avail warn = 0\n",
        )
        text += daemon_section(d, "osd", f"osd data = {d}/osd\n{self._store_conf()}\n")
        if self.rgw:
            text += daemon_section(
                d,
                "client.rgw.gw",
                f"rgw data = {d}/rgw\n"
                f"rgw frontends = beast endpoint={HOST}:{self.rgw_port}\n"
                "rgw enable apis = s3, swift, swift_auth, admin\n"
                # bounds the SIGTERM shutdown (default 120 s when RADOS is unreachable)
                "rgw exit timeout secs = 5\n",
            )
        return text

    # -- start-up ---------------------------------------------------------------------------

    def _start(self) -> None:
        bins = ["ceph-mon", "ceph-osd", "monmaptool"]
        require(bins + (["radosgw", "radosgw-admin"] if self.rgw else []), PACKAGES)
        try:
            import rados  # noqa: F401  (the harness drives the mon through it)
        except ImportError as e:
            raise BackendMissing(f"python rados bindings: apt-get install {PACKAGES}") from e
        ports = free_ports(3 if self.rgw else 2)
        self.mon_ports = ports[:2]
        self.rgw_port = ports[2] if self.rgw else None
        d = self.dir
        for sub in ("mon", "osd", "rgw", "run", "crash"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        self.keyring.write_text(keyring_text())
        self.keyring.chmod(0o600)
        self.conf.write_text(self._conf_text())
        conf = ["-c", str(self.conf)]

        v2, v1 = self.mon_ports
        monmap, addrs = d / "monmap", f"[v2:{HOST}:{v2},v1:{HOST}:{v1}]"
        run(["monmaptool", *conf, "--create", "--fsid", self.fsid, "--addv", "a", addrs, monmap])
        run(["ceph-mon", *conf, "--mkfs", "-i", "a", "--monmap", monmap, "--keyring", self.keyring])
        mon = self.spawn("mon.a", ["ceph-mon", *conf, "-f", "-i", "a"])

        cluster = self._connect(mon)
        try:
            osd_uuid = str(uuid.uuid4())
            osd_id = self._mon_command(cluster, {"prefix": "osd new", "uuid": osd_uuid}).strip()
            if osd_id != "0":
                raise BackendError(f"osd new gave id {osd_id!r}, expected 0")
            run(["ceph-osd", *conf, "--mkfs", "-i", "0", "--osd-uuid", osd_uuid], timeout=120)
            osd = self.spawn("osd.0", ["ceph-osd", *conf, "-f", "-i", "0"])
            daemons = [mon, osd]
            self._smoke(cluster, daemons)
        finally:
            cluster.shutdown()
        if self.rgw:
            # only now: started with the OSD still booting, radosgw sometimes stalled 5 s
            daemons.append(self.spawn("rgw.gw", ["radosgw", *conf, "-f", "-n", "client.rgw.gw"]))
            wait_until(
                lambda: http_status(f"http://{HOST}:{self.rgw_port}/", timeout=1) is not None,
                "radosgw to answer HTTP",
                daemons,
                timeout=60,
            )
            self._rgw_users()

    def _connect(self, mon: Any) -> Any:
        """A python-rados handle as client.admin, once the mon answers."""
        import rados

        handle: list[Any] = []

        def attempt() -> bool:
            c = rados.Rados(conffile=str(self.conf), rados_id="admin")
            c.conf_set("client_mount_timeout", "2")
            c.conf_set("rados_mon_op_timeout", "10")
            c.conf_set("rados_osd_op_timeout", "5")
            try:
                c.connect()
            except rados.Error:
                c.shutdown()
                return False
            handle.append(c)
            return True

        wait_until(attempt, "the mon to accept a client", [mon], timeout=30)
        return handle[0]

    @staticmethod
    def _mon_command(cluster: Any, cmd: dict[str, Any]) -> str:
        ret, out, err = cluster.mon_command(json.dumps(cmd), b"")
        if ret != 0:
            raise BackendError(f"mon command {cmd}: {os.strerror(-ret)}: {err}")
        return out.decode()

    def _smoke(self, cluster: Any, daemons: list[Any]) -> None:
        """Wait until a RADOS write/read works (i.e. the OSD is up and its PGs active)."""
        import rados

        cluster.create_pool("harness")
        self._mon_command(
            cluster,
            {"prefix": "osd pool application enable", "pool": "harness", "app": "rados"},
        )
        ioctx = cluster.open_ioctx("harness")
        payload = secrets.token_bytes(64)

        def osd_up() -> bool:  # cheap to poll, unlike a write that blocks until its timeout
            stat = json.loads(self._mon_command(cluster, {"prefix": "osd stat", "format": "json"}))
            return int(stat.get("num_up_osds", 0)) > 0

        def attempt() -> bool:
            try:  # each try is bounded by rados_osd_op_timeout
                ioctx.write_full("smoke", payload)
                return ioctx.read("smoke") == payload
            except rados.Error:
                return False

        try:
            wait_until(osd_up, "the OSD to be up", daemons, timeout=60, interval=0.02)
            wait_until(attempt, "a RADOS write to succeed", daemons, timeout=60)
        finally:
            ioctx.close()

    def kill(self, name: str) -> None:
        """SIGKILL a daemon; a killed OSD is also marked down, as its peers would report it
        in a real cluster (with one OSD nobody does, and its restart then never served:
        measured, RADOS writes still timed out 150 s after it booted)."""
        super().kill(name)
        if name.startswith("osd."):
            cluster = self._connect(self.daemon("mon.a"))
            try:
                self._mon_command(cluster, {"prefix": "osd down", "ids": [name[4:]]})
            finally:
                cluster.shutdown()

    def ready(self, name: str, timeout: float) -> None:
        """After a restart: the OSD is up and a RADOS write succeeds again, or radosgw
        answers HTTP (see Backend.restart)."""
        import rados

        d = self.daemon(name)
        if name == "rgw.gw":
            wait_until(lambda: http_status(f"http://{HOST}:{self.rgw_port}/", timeout=1)
                       is not None, "radosgw to answer HTTP", [d], timeout=timeout)
            return
        if name != "osd.0":
            super().ready(name, timeout)
        cluster = self._connect(self.daemon("mon.a"))
        try:
            ioctx = cluster.open_ioctx("harness")
            payload = secrets.token_bytes(64)

            def attempt() -> bool:
                try:
                    ioctx.write_full("smoke", payload)
                    return ioctx.read("smoke") == payload
                except rados.Error:
                    return False

            try:
                wait_until(attempt, "a RADOS write after the OSD restart", [d], timeout=timeout)
            finally:
                ioctx.close()
        finally:
            cluster.shutdown()

    def _rgw_users(self) -> None:
        """An S3 user with fixed keys and a Swift subuser (radosgw-admin talks to RADOS)."""
        admin = ["radosgw-admin", "-c", str(self.conf)]
        uid = f"--uid={RGW_UID}"
        s3_keys = [f"--access-key={self.s3_access_key}", f"--secret-key={self.s3_secret_key}"]
        run([*admin, "user", "create", uid, "--display-name=imagefs tests", *s3_keys])
        swift = [f"--subuser={RGW_SWIFT_USER}", "--access=full", "--key-type=swift"]
        run([*admin, "subuser", "create", uid, *swift, f"--secret-key={self.swift_key}"])

    # -- describe ---------------------------------------------------------------------------

    @property
    def info(self) -> CephInfo:
        base = f"http://{HOST}:{self.rgw_port}" if self.rgw else None
        return CephInfo(
            dir=self.dir,
            conf=str(self.conf),
            keyring=str(self.keyring),
            fsid=self.fsid,
            user="admin",
            s3_endpoint=base,
            s3_access_key=self.s3_access_key if base else None,
            s3_secret_key=self.s3_secret_key if base else None,
            rgw_swift_auth_url=f"{base}/auth/1.0" if base else None,
            rgw_swift_user=RGW_SWIFT_USER if base else None,
            rgw_swift_key=self.swift_key if base else None,
        )

    def env(self) -> dict[str, str]:
        """``CEPH_CONF``/``CEPH_KEYRING`` (``CEPH2_*`` for the second cluster), S3 and Swift."""
        p = self.name.upper()
        env = {f"{p}_CONF": str(self.conf), f"{p}_KEYRING": str(self.keyring)}
        i = self.info
        if i.s3_endpoint:
            env |= {
                "AWS_ACCESS_KEY_ID": str(i.s3_access_key),
                "AWS_SECRET_ACCESS_KEY": str(i.s3_secret_key),
                "AWS_ENDPOINT_URL": i.s3_endpoint,
                "S3_ENDPOINT": i.s3_endpoint,
                "RGW_ST_AUTH": str(i.rgw_swift_auth_url),
                "RGW_ST_USER": str(i.rgw_swift_user),
                "RGW_ST_KEY": str(i.rgw_swift_key),
            }
        return env
