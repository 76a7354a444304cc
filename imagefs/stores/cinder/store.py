"""``CinderStore``: the store interface over the pieces of this package (see ``__init__.py``)."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from imagefs.options import StoreConfig, option
from imagefs.stores.base import (
    BackendError,
    Capability,
    Changed,
    ImageInfo,
    NotFound,
    OptionError,
    Store,
    Upload,
    check_name,
    user_meta,
)
from imagefs.stores.cinder.api import MV_ATTACH, CinderApi, error_for
from imagefs.stores.cinder.layout import (
    CONNECTOR_PREFIX,
    META_PREFIX,
    NAME_KEY,
    UUID,
    Layout,
    cinder_name,
    info,
    meta_of,
    parse_pairs,
)
from imagefs.stores.cinder.leftovers import Leftovers
from imagefs.stores.cinder.rbdio import RbdAccess
from imagefs.stores.cinder.reading import Readers
from imagefs.stores.cinder.replace import Replacer
from imagefs.stores.cinder.spare import SPARE_IDLE, Spare
from imagefs.stores.cinder.volumes import Volumes
from imagefs.stores.owners import leftover_age_option, new_owner_id
from imagefs.stores.rbd.cluster import LOCK_WAIT_FRACTION
from imagefs.stores.secrets import read_secret_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CinderOptions:
    auth: str = option(("keystone", "noauth"), default="keystone",
                       help="keystone (production) or Cinder's noauth (tests)")
    endpoint: str | None = option("str", help="noauth: the API's /v3 URL; keystone: overrides "
                                              "the catalog's block-storage endpoint")
    user_id: str | None = option("str", help="noauth: the user of the token USER_ID:PROJECT_ID")
    project_id: str | None = option("str", help="noauth: the project; keystone: scope by "
                                                "project id")
    auth_url: str | None = option("str", help="keystone: the identity v3 URL")
    user: str | None = option("str", help="keystone: user name")
    password_file: str | None = option("secret_file",
                                       help="keystone: file holding the password")
    project: str | None = option("str", help="keystone: project name (or project_id)")
    user_domain: str = option("str", default="Default")
    project_domain: str = option("str", default="Default")
    region: str = option("str", default="")
    interface: str = option(("public", "internal", "admin"), default="public")
    cacert: str | None = option("path", help="CA bundle for HTTPS")
    insecure: bool = option("bool", default=False, help="do not verify HTTPS certificates")
    volume_type: str = option("str", default="", help="type of the volumes imagefs creates")
    ceph_conf: str = option("path", required=True, help="ceph.conf of the cluster behind Cinder")
    ceph_user: str = option("str", default="",
                            help="cephx client id; default: the auth_username Cinder reports")
    ceph_keyring: str | None = option("path", help="keyring file, if ceph.conf does not name it")
    rbd_pool: str = option("str", default="",
                           help="Cinder's RBD pool: volumes attached elsewhere (not "
                                "multiattach) are then read without an attachment")
    glance_volumes: bool = option("bool", default=True,
                                  help="show Glance's image-<id> volumes (under the image id)")
    match_metadata: tuple[str, ...] = option("list", default=(),
                                             help='"key=value" pairs a volume must carry to be '
                                                  "shown; imagefs sets them on the volumes it "
                                                  "writes")
    detach_after: float = option("seconds", default=10.0,
                                 help="seconds a read attachment is kept after its last read")
    prepare_volumes: bool = option("bool", default=True,
                                   help="keep the next upload's volume created and attached "
                                        "ahead (after a first upload; removed when idle)")
    leftover_age: float = leftover_age_option()


class CinderStore(Store):
    type_name = "cinder"
    Options = CinderOptions
    capabilities = Capability.RANDOM_WRITE
    opts: CinderOptions

    def __init__(self, cfg: StoreConfig) -> None:
        super().__init__(cfg)
        o = self.opts
        self.connector_host = CONNECTOR_PREFIX + new_owner_id()
        self.layout = Layout(o.glance_volumes, parse_pairs(o.match_metadata),
                             self.connector_host)
        # The API reads its keys from the validated table (its unit tests give it a dict).
        self.api = CinderApi(self.id, self.options, self.timeout, self._password)
        self.rbdio = RbdAccess(self.id, o.ceph_conf, o.ceph_user or "", o.ceph_keyring,
                               self.timeout)
        self.volumes = Volumes(self.id, self.api, self.rbdio, self.connector_host,
                               o.volume_type or "", self.layout.match, self.wait_budget)
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None
        self.readers = Readers(self.id, self.api, self.rbdio, self.volumes, self.layout,
                               o.rbd_pool or "", self._lock, self._stop, self.lock_wait)
        self.spare = Spare(self.id, self.volumes, o.prepare_volumes, self._lock, self._stop)
        self.replacer = Replacer(self)

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        if options.get("auth", "keystone") == "noauth":
            for key in ("endpoint", "user_id", "project_id"):
                if not options.get(key):
                    raise OptionError(key, "required with auth = \"noauth\"")
        else:
            if not options.get("auth_url"):
                raise OptionError("auth_url", "a Keystone v3 URL (or auth = \"noauth\")")
            if not options.get("user"):
                raise OptionError("user", "the Keystone user name")
            if not options.get("password_file"):
                raise OptionError("password_file", "a file holding the Keystone password")
            if not options.get("project") and not options.get("project_id"):
                raise OptionError("project", "a project name (or project_id)")
        for key in ("endpoint", "auth_url"):
            url = options.get(key) or ""
            if url and (not re.match(r"^https?://[^/@]+", url)):
                raise OptionError(key, "an http(s) URL without credentials")
        try:
            parse_pairs(options.get("match_metadata"))
        except ValueError as e:
            raise OptionError("match_metadata", f'entries like "key=value", got {e}') from None

    def _password(self) -> str:
        return read_secret_file(self.id, "password_file", self.opts.password_file or "")

    # ------------------------------------------------------------------ connection
    def open(self) -> None:
        self.api.open()
        status, body = self.api.call("GET", "/volumes?limit=1", MV_ATTACH,
                                     what="checking the volume API")
        if status == 406:
            raise BackendError(f"store {self.id}: Cinder does not speak microversion "
                               f"{MV_ATTACH} (attachments with a mode); it is too old")
        if status != 200:
            raise error_for(status, str(body)[:300], f"store {self.id}: volume API")
        if self.opts.ceph_user:
            self.rbdio.connect()  # fail at mount, not at the first read
        self._stop.clear()
        self._reaper = threading.Thread(target=self._reap_loop, daemon=True,
                                        name=f"cinder-{self.id}-detach")
        self._reaper.start()
        log.info("store %s: Cinder volume API ready (%s)", self.id,
                 self.opts.endpoint or self.opts.auth_url)

    def _reap_loop(self) -> None:
        """Remove an idle spare volume and detach idle read attachments, until close."""
        detach_after = self.opts.detach_after
        interval = min(5.0, max(0.2, detach_after / 2))
        while not self._stop.wait(interval):
            self.spare.drop(idle=SPARE_IDLE)
            self.readers.reap(detach_after)

    def close(self) -> None:
        """Detach every read attachment (waiting, bounded, for reads in flight), then
        disconnect."""
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join(timeout=5)
        self.spare.wait_made(self.lock_wait())  # a spare being made: let it finish
        handles, busy = self.readers.take_all()
        if busy:
            log.warning("store %s: closing with %d read(s) still running", self.id, busy)
        self.spare.drop()
        self.readers.close_all(handles)
        self.rbdio.close()
        self.api.close()

    def lock_wait(self) -> float:
        return max(0.05, self.timeout * LOCK_WAIT_FRACTION)

    def wait_budget(self) -> float:
        """How long one call may wait for Cinder to finish something (create, extend...)."""
        return self.lock_wait()

    # ------------------------------------------------------------------ names → volumes
    def named(self, name: str) -> list[dict[str, Any]]:
        """Every volume that would have file name ``name`` (Cinder's exact name filter)."""
        vols = list(self.api.volumes(name=cinder_name(name)))
        if self.layout.glance_volumes and UUID.match(name):
            vols += self.api.volumes(name=f"image-{name}")
        return [v for v in vols if self.layout.display(v) == name]

    def _resolve(self, name: str) -> tuple[dict[str, Any], int]:
        check_name(name)
        hit = self.layout.pick(self.named(name)).get(name)
        if hit is None:
            raise NotFound(f"{self.id}/{name}: no such image")
        return hit

    def list(self) -> Iterator[ImageInfo]:
        images = self.layout.pick(list(self.api.volumes()))
        for name, (v, size) in sorted(images.items()):
            yield info(name, v, size)

    def stat(self, name: str) -> ImageInfo:
        v, size = self._resolve(name)
        return info(name, v, size)

    def read_range(self, name: str, version: str, offset: int, length: int) -> bytes:
        return self.readers.read(name, version, offset, length)

    # ------------------------------------------------------------------ changes
    def upload(self, name: str, size_hint: int | None = None) -> Upload:
        from imagefs.stores.cinder.upload import CinderUpload

        self._writable()
        check_name(name)
        return CinderUpload(self, name, size_hint)

    def rename(self, old: str, new: str) -> ImageInfo:
        self._writable()
        check_name(new)
        v, size = self._resolve(old)
        if old != new:
            self.replacer.refuse_readonly(v, old, "renaming")
            meta = meta_of(v)
            # The name alone, unless the exact-name key must change with it (then the whole
            # metadata, in the same PUT).
            full = NAME_KEY in meta or cinder_name(new) != new
            v = self.replacer.publish(str(v["id"]), new, meta if full else None)
        return info(new, v, size)

    def delete(self, name: str) -> None:
        self._writable()
        v, _ = self._resolve(name)
        vid = str(v["id"])
        self.readers.drop(vid)
        v = self.api.volume(vid)  # after our own detach
        self.replacer.check_replaceable(v, name, "deleting")
        self.replacer.check_watchers(v, name)
        self.volumes.delete(vid, wait=True, what=f"{name} (volume {vid})")

    def set_meta(self, name: str, meta: Mapping[str, str], expect: str | None = None
                 ) -> ImageInfo:
        self._writable()
        v, size = self._resolve(name)
        if expect is not None and v["id"] != expect:
            raise Changed(f"{self.id}/{name} is no longer version {expect}")
        stored = {f"{META_PREFIX}{k}": val for k, val in user_meta(meta).items()}
        # By volume id: hashes land on the version they were computed from, whatever the
        # name refers to by now.
        body = self.api.request("POST", f"/volumes/{v['id']}/metadata",
                                body={"metadata": stored}, what=f"set metadata of {name}")
        v = {**v, "metadata": body.get("metadata", {**meta_of(v), **stored})}
        return info(name, v, size)

    def location(self, name: str) -> str:
        v, _ = self._resolve(name)
        return f"cinder://{self.id}/{v['id']}"

    # ------------------------------------------------------------------ housekeeping
    def cleanup_leftovers(self) -> int:
        """Remove uploads and read attachments of dead imagefs processes; finish or undo
        replacements a crash cut short."""
        if self.read_only:
            return 0
        return Leftovers(self).cleanup()

    def usage(self) -> tuple[int, int] | None:
        images = list(self.list())
        return len(images), sum(i.size for i in images)

    def properties(self) -> dict[str, str]:
        o = self.opts
        props = {"auth": o.auth, "volume_type": o.volume_type or "",
                 "glance_volumes": "true" if o.glance_volumes else "false"}
        if o.auth == "noauth":
            props.update(endpoint=o.endpoint or "", project_id=o.project_id or "")
        else:
            props.update(auth_url=o.auth_url or "", project=o.project or o.project_id or "")
            if o.endpoint:
                props["endpoint"] = o.endpoint
        return props
