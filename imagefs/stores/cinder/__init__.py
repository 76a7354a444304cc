"""``type = "cinder"``: images are Cinder volumes, one volume per image, as Glance keeps them.

Layout (interoperable with glance_store's cinder driver both ways)
    Glance names an image's volume ``image-<image id>`` with metadata ``glance_image_id``,
    ``image_size`` (the exact byte size: volumes are whole GiB) and ``image_owner``, and sets
    the volume's read-only flag once the upload is done. Such a volume is shown under the image
    id. imagefs's own volumes are named after the file and carry ``image_size`` too, plus
    ``imagefs.<key>`` metadata (mtime, mode, Glance's hashes). A volume without a valid
    ``image_size`` holds no image and is never shown (nor is a volume that lacks one of
    ``match_metadata``, or a Glance volume that is still being written: attached and not yet
    read-only). Sizes come from ``image_size``; reads stop there.

Names and duplicates
    Cinder allows several volumes with one name, so every lookup resolves a name the same way:
    (1) a volume whose ``imagefs-replaced-by`` metadata names another volume of that name is
    being replaced and does not count; (2) of the rest, the newest (``created_at``, then id)
    wins. ``stat`` asks for the name (and ``image-<name>`` when it is a UUID) with Cinder's
    exact ``name`` filter and compares again here (MySQL compares case-insensitively).
    Cinder strips white space at both ends of a name: such a file name is kept exactly in
    ``imagefs-name`` metadata, the volume named as Cinder would have it.

Uploads (see ``upload.py``)
    A new image goes to a hidden volume ``.imagefs-<owner id>`` (``owners.py``), attached
    read-write and extended while attached as bytes arrive (whole GiB: volumes never shrink).
    Commit flushes and publishes with one ``PUT /volumes/<id>`` that sets the name and the
    whole metadata (``image_size``, mtime, mode, hashes) in one database update: the name never
    shows a volume without its size. The upload's attachment and Image then serve this mount's
    readers of the new image (``detach_after`` applies). Replacing an existing image first tags
    it ``imagefs-replaced-by = <new id>`` (so it stops counting the moment the new one has the
    name), then renames, then deletes it. Creating and attaching a volume costs Cinder one to
    two seconds, so after an upload the next upload's volume is made and attached in the
    background (``prepare_volumes``; removed when idle and at unmount). A crash leaves hidden
    volumes, attachments, or a tagged volume: ``cleanup_leftovers`` at the next mount removes
    hidden volumes and attachments of dead imagefs processes (this host: the process is gone;
    other hosts: older than ``leftover_age``; the connector host ``imagefs_<owner id>`` names
    the process), deletes tagged volumes whose replacement has their name, and untags the
    others.

Refusals
    A read-only volume (Glance marks finished images read-only) is never replaced, renamed or
    deleted: EROFS, and a log line saying how to clear the flag; metadata (chmod, touch,
    hashes) may still change. A volume attached by anyone else (a VM, another imagefs) is not
    replaced or deleted: EBUSY. Delete waits until Cinder has removed the volume; before it,
    if the image's pool is known, RBD watchers (clients that opened it read-write without an
    attachment) also make it EBUSY: Cinder 21 would not refuse, it would move the image to the
    pool's trash.

Reads
    ``version`` is the volume id: every upload is a new volume, renames and metadata keep it.
    Reads attach the volume (attachments API: create with a connector and mode ``ro``, 3.54;
    complete, 3.44) and open its RBD image with librbd (``rbdio.py``); one attachment and one
    Image per volume serve all readers of this mount, and are dropped after ``detach_after``
    idle seconds. While attached, Cinder refuses to delete the volume, so the bytes read are
    that version's. A volume that is not multiattach can have one attachment at a time: a
    second host reading the same image meanwhile gets EBUSY (Glance's own readers have the same
    limit; a multiattach ``volume_type`` lifts it), unless the store knows the volume's RBD
    image without attaching (``rbd_pool``, or a pool this mount saw in a connection_info): it
    then reads it read-only without an attachment, and since nothing of ours then keeps the
    volume from being deleted, checks after every read that ``rbd_id.volume-<id>`` still
    names the image it opened (librbd reads zeros from a removed image): those bytes or EIO.
    Only RBD-backed volumes can be read or written: any other ``driver_volume_type`` is
    EOPNOTSUPP with a message naming it.

Locations
    ``cinder://<store id>/<volume id>``, as glance_store records locations in multi-store mode.

Request pattern: a read of an attached volume is one librbd read; the first read of a volume
costs a GET and two attachment calls (create, complete); an upload takes the volume made
ahead (else create, wait, attach: 1-2 s here), one extend per GiB grown, and at commit 1-2
listing GETs and the PUT (plus tag and DELETE when replacing); idle detach is one DELETE.
"""

from __future__ import annotations

import datetime
import logging
import platform
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from imagefs.options import Option, StoreConfig
from imagefs.stores.base import (
    HIDDEN_PREFIX,
    BackendError,
    Busy,
    Capability,
    Changed,
    ImageInfo,
    NotFound,
    OptionError,
    ReadOnly,
    Store,
    StoreError,
    Upload,
    check_name,
    is_hidden,
    meta_mode,
    meta_mtime,
    user_meta,
)
from imagefs.stores.cinder.api import (
    MV_ATTACH,
    MV_ATTACHMENTS,
    MV_COMPLETE,
    ApiError,
    CinderApi,
    error_for,
    message,
)
from imagefs.stores.cinder.rbdio import RbdAccess, close_image, rbd_error, rbd_spec
from imagefs.stores.owners import new_owner_id, owner_state

log = logging.getLogger(__name__)

GiB = 1 << 30
#: Glance's key for the exact image size (its cinder driver reads it back the same way).
IMAGE_SIZE = "image_size"
#: imagefs's per-image metadata: ``imagefs.<key>`` (mtime, mode, hashes, uid/gid).
META_PREFIX = "imagefs."
#: Internal keys (with a '-' no user key can have): this volume is being replaced by volume
#: <id>; the exact file name, where Cinder keeps another (it strips white space at both ends).
REPLACED_KEY = "imagefs-replaced-by"
NAME_KEY = "imagefs-name"
#: Admin metadata Cinder mixes into a volume's metadata: never written back as user metadata.
ADMIN_KEYS = frozenset({"readonly", "attached_mode"})
#: Cinder shows the read-only flag (admin metadata) among the metadata.
READONLY_KEY = "readonly"
#: Prefix of the connector host imagefs attaches with: ``imagefs_<owner id>``.
CONNECTOR_PREFIX = "imagefs_"
#: Statuses in which a volume's bytes are complete and readable.
READABLE = frozenset({"available", "in-use", "attaching", "detaching", "reserved", "uploading",
                      "backing-up", "retyping"})
#: Statuses that end by themselves: an attach or delete that meets one waits and tries again.
TRANSIENT = frozenset({"attaching", "detaching", "reserved", "extending", "creating",
                       "downloading", "uploading", "backing-up", "retyping"})
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_CURRENT = re.compile(r"current status is ([\w-]+)")
#: A spare upload volume unused this long is removed (it holds quota and an attachment).
SPARE_IDLE = 60.0
#: Waits for an upload's mutex, reads in flight, and status changes, as a fraction of the
#: store timeout: shorter than the bridge's deadline, so a stuck call surfaces here.
LOCK_WAIT_FRACTION = 0.8


def _epoch(text: Any) -> float:
    """Cinder's ``created_at`` (ISO 8601, UTC, usually without a zone) → seconds."""
    try:
        dt = datetime.datetime.fromisoformat(str(text))
    except ValueError:
        return 0.0
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.UTC)
    return dt.timestamp()


def _meta(v: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): str(val) for k, val in (v.get("metadata") or {}).items()}


def _readonly(v: Mapping[str, Any]) -> bool:
    return _meta(v).get(READONLY_KEY, "").lower() == "true"


def cinder_name(name: str) -> str:
    """The volume name Cinder keeps for file name ``name`` (it strips white space)."""
    return name.strip() or "-"


def _parse_pairs(items: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        if not sep or not key:
            raise ValueError(item)
        out[key] = value
    return out


@dataclass
class _ReadHandle:
    """One attachment and read-only Image of a volume, shared by this mount's readers."""

    vid: str
    #: None: opened without an attachment (the volume is attached elsewhere); every read is
    #: then checked against ``rbd_id`` (see ``read_range``).
    attachment: str | None
    image: Any
    size: int
    refs: int = 0
    last_used: float = 0.0
    doomed: bool = False
    spec: tuple[str, str, str] = ("", "", "")
    image_id: str = ""


class CinderStore(Store):
    type_name = "cinder"
    OPTIONS = {
        "auth": Option(("keystone", "noauth"), default="keystone",
                       help="keystone (production) or Cinder's noauth (tests)"),
        "endpoint": Option("str", help="noauth: the API's /v3 URL; keystone: overrides the "
                                       "catalog's block-storage endpoint"),
        "user_id": Option("str", help="noauth: the user of the token USER_ID:PROJECT_ID"),
        "project_id": Option("str", help="noauth: the project; keystone: scope by project id"),
        "auth_url": Option("str", help="keystone: the identity v3 URL"),
        "user": Option("str", help="keystone: user name"),
        "password_file": Option("secret_file", help="keystone: file holding the password"),
        "project": Option("str", help="keystone: project name (or project_id)"),
        "user_domain": Option("str", default="Default"),
        "project_domain": Option("str", default="Default"),
        "region": Option("str", default=""),
        "interface": Option(("public", "internal", "admin"), default="public"),
        "cacert": Option("path", help="CA bundle for HTTPS"),
        "insecure": Option("bool", default=False, help="do not verify HTTPS certificates"),
        "volume_type": Option("str", default="", help="type of the volumes imagefs creates"),
        "ceph_conf": Option("path", required=True, help="ceph.conf of the cluster behind Cinder"),
        "ceph_user": Option("str", default="",
                            help="cephx client id; default: the auth_username Cinder reports"),
        "ceph_keyring": Option("path", help="keyring file, if ceph.conf does not name it"),
        "rbd_pool": Option("str", default="",
                           help="Cinder's RBD pool: volumes attached elsewhere (not "
                                "multiattach) are then read without an attachment"),
        "glance_volumes": Option("bool", default=True,
                                 help="show Glance's image-<id> volumes (under the image id)"),
        "match_metadata": Option("list", default=(),
                                 help='"key=value" pairs a volume must carry to be shown; '
                                      "imagefs sets them on the volumes it writes"),
        "detach_after": Option("float", default=10.0,
                               help="seconds a read attachment is kept after its last read"),
        "prepare_volumes": Option("bool", default=True,
                                  help="keep the next upload's volume created and attached "
                                       "ahead (after a first upload; removed when idle)"),
        "leftover_age": Option("float", default=86400.0,
                               help="seconds after which uploads of other hosts count as dead"),
    }
    capabilities = Capability.RANDOM_WRITE

    def __init__(self, cfg: StoreConfig) -> None:
        super().__init__(cfg)
        o = self.options
        self.glance_volumes: bool = o["glance_volumes"]
        self.match: dict[str, str] = _parse_pairs(o["match_metadata"])
        self.volume_type: str = o["volume_type"] or ""
        self.detach_after: float = o["detach_after"]
        self.rbd_pool: str = o["rbd_pool"] or ""
        self.leftover_age: float = o["leftover_age"]
        self.connector_host = CONNECTOR_PREFIX + new_owner_id()
        self.api = CinderApi(self.id, o, self.timeout, self._password)
        self.rbdio = RbdAccess(self.id, o["ceph_conf"], o["ceph_user"] or "",
                               o["ceph_keyring"], self.timeout)
        self._handles: dict[str, _ReadHandle] = {}
        self._attach_locks: dict[str, threading.Lock] = {}
        #: (pool, namespace) of each Cinder backend seen in a connection_info, by the volume's
        #: ``os-vol-host-attr:host`` (or "" when Cinder does not show it): for watcher checks.
        self._pools: dict[str, tuple[str, str]] = {}
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None
        self.prepare_volumes: bool = o["prepare_volumes"]
        self._spare: tuple[str, str, float, str, tuple[str, str, str]] | None = None
        self._spare_used = 0.0
        self._preparing = False
        self._spare_ready = threading.Condition(self._lock)

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
            _parse_pairs(options.get("match_metadata"))
        except ValueError as e:
            raise OptionError("match_metadata", f'entries like "key=value", got {e}') from None
        for key in ("detach_after", "leftover_age"):
            value = options.get(key)
            if value is not None and value < 0:
                raise OptionError(key, "a number of seconds, 0 or more")

    def _password(self) -> str:
        path = self.options["password_file"]
        try:
            with open(path, encoding="utf-8") as f:
                secret = f.read().strip()
        except OSError as e:
            raise BackendError(f"store {self.id}: cannot read password_file {path}: "
                               f"{e.strerror}") from None
        if not secret:
            raise BackendError(f"store {self.id}: password_file {path} is empty")
        return secret

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
        if self.options["ceph_user"]:
            self.rbdio.connect()  # fail at mount, not at the first read
        self._stop.clear()
        self._reaper = threading.Thread(target=self._reap_loop, daemon=True,
                                        name=f"cinder-{self.id}-detach")
        self._reaper.start()
        log.info("store %s: Cinder volume API ready (%s)", self.id,
                 self.options.get("endpoint") or self.options.get("auth_url"))

    def close(self) -> None:
        """Detach every read attachment (waiting, bounded, for reads in flight), then
        disconnect."""
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join(timeout=5)
        with self._spare_ready:  # a spare being made: let it finish, then remove it
            deadline = time.monotonic() + self.lock_wait()
            while self._preparing and time.monotonic() < deadline:
                self._spare_ready.wait(0.1)
        deadline = time.monotonic() + self.lock_wait()
        while True:
            with self._lock:
                busy = sum(h.refs for h in self._handles.values())
                if not busy or time.monotonic() > deadline:
                    handles, self._handles = list(self._handles.values()), {}
                    break
            time.sleep(0.02)
        if busy:
            log.warning("store %s: closing with %d read(s) still running", self.id, busy)
        self._drop_spare()
        for h in handles:
            h.doomed = True
            if h.refs == 0:
                self._close_handle(h)
        self.rbdio.close()
        self.api.close()

    def lock_wait(self) -> float:
        return max(0.05, self.timeout * LOCK_WAIT_FRACTION)

    def wait_budget(self) -> float:
        """How long one call may wait for Cinder to finish something (create, extend...)."""
        return self.lock_wait()

    # ------------------------------------------------------------------ volumes → images
    def _display(self, v: Mapping[str, Any]) -> str | None:
        """The file name a volume would have, or None (hidden, not a valid file name)."""
        name = str(v.get("name") or "")
        if not name or is_hidden(name):
            return None
        meta = _meta(v)
        gid = meta.get("glance_image_id")
        exact = meta.get(NAME_KEY)
        if exact is not None and cinder_name(exact) == name:
            name = exact
        elif gid and name == f"image-{gid}":
            if not self.glance_volumes:
                return None
            name = gid
        try:
            check_name(name)
        except StoreError:
            return None
        return name

    def _image_size(self, v: Mapping[str, Any]) -> int | None:
        """The exact image size, or None if the volume holds no (complete) image."""
        if str(v.get("status")) not in READABLE:
            return None
        meta = _meta(v)
        if any(meta.get(k) != val for k, val in self.match.items()):
            return None
        try:
            size = int(meta[IMAGE_SIZE])
        except (KeyError, ValueError):
            return None
        if size < 0 or size > int(v.get("size") or 0) * GiB:
            return None
        if "glance_image_id" in meta and not _readonly(v) and self._foreign_attachments(v):
            return None  # Glance is still writing it (read-only comes when it is done)
        return size

    def _foreign_attachments(self, v: Mapping[str, Any], imagefs_too: bool = False
                             ) -> list[dict[str, Any]]:
        """Attachments not made by this store; with ``imagefs_too``, also other imagefs's."""
        out = []
        for a in v.get("attachments") or []:
            host = str(a.get("host_name") or "")
            if host == self.connector_host:
                continue
            if host.startswith(CONNECTOR_PREFIX) and not imagefs_too:
                continue
            out.append(dict(a))
        return out

    def _pick(self, volumes: list[dict[str, Any]]) -> dict[str, tuple[dict[str, Any], int]]:
        """File name → (volume, size) by the rules in the module docstring."""
        groups: dict[str, list[tuple[dict[str, Any], int]]] = {}
        for v in volumes:
            name = self._display(v)
            if name is None:
                continue
            size = self._image_size(v)
            if size is not None:
                groups.setdefault(name, []).append((v, size))
        out = {}
        for name, group in groups.items():
            ids = {v["id"] for v, _ in group}
            live = [(v, s) for v, s in group if _meta(v).get(REPLACED_KEY) not in ids]
            live = live or group
            out[name] = max(live, key=lambda vs: (_epoch(vs[0].get("created_at")), vs[0]["id"]))
        return out

    def _info(self, name: str, v: Mapping[str, Any], size: int) -> ImageInfo:
        meta = {k[len(META_PREFIX):]: val for k, val in _meta(v).items()
                if k.startswith(META_PREFIX)}
        return ImageInfo(name=name, size=size,
                         mtime=meta_mtime(meta, _epoch(v.get("created_at"))),
                         mode=meta_mode(meta), version=str(v["id"]), meta=meta)

    def _named(self, name: str) -> list[dict[str, Any]]:
        """Every volume that would have file name ``name`` (Cinder's exact name filter)."""
        vols = list(self.api.volumes(name=cinder_name(name)))
        if self.glance_volumes and _UUID.match(name):
            vols += self.api.volumes(name=f"image-{name}")
        return [v for v in vols if self._display(v) == name]

    def _resolve(self, name: str) -> tuple[dict[str, Any], int]:
        check_name(name)
        hit = self._pick(self._named(name)).get(name)
        if hit is None:
            raise NotFound(f"{self.id}/{name}: no such image")
        return hit

    def list(self) -> Iterator[ImageInfo]:
        images = self._pick(list(self.api.volumes()))
        for name, (v, size) in sorted(images.items()):
            yield self._info(name, v, size)

    def stat(self, name: str) -> ImageInfo:
        v, size = self._resolve(name)
        return self._info(name, v, size)

    # ------------------------------------------------------------------ attachments
    def _connector(self) -> dict[str, Any]:
        return {"host": self.connector_host, "ip": "127.0.0.1", "platform": platform.machine(),
                "os_type": "linux", "multipath": False, "mountpoint": "imagefs"}

    def attach(self, vid: str, mode: str, deadline: float) -> tuple[str, tuple[str, str, str]]:
        """Attach volume ``vid`` (rw/ro): (attachment id, RBD spec), the volume in-use.

        A volume in a passing state (attaching, detaching...) is tried again until
        ``deadline``; one attached elsewhere (not multiattach) is Busy.
        """
        body = {"attachment": {"volume_uuid": vid, "connector": self._connector(),
                               "mode": mode}}
        delay = 0.05
        while True:
            status, data = self.api.call("POST", "/attachments", MV_ATTACH, body,
                                         what=f"attaching volume {vid}")
            if status == 200:
                break
            err = error_for(status, message(data), f"store {self.id}: attaching volume {vid}")
            if isinstance(err, ApiError) and status == 400:
                m = _CURRENT.search(err.message)
                current = m.group(1) if m else ""
                if current in TRANSIENT and time.monotonic() < deadline:
                    time.sleep(delay)
                    delay = min(delay * 1.5, 0.5)
                    continue
                if current == "in-use":
                    raise Busy(f"store {self.id}: volume {vid} is attached elsewhere and is not "
                               "multiattach (use a multiattach volume_type for images read "
                               f"from several hosts at once): {err.message}")
            raise err
        att = data["attachment"]
        aid = str(att["id"])
        try:
            spec = rbd_spec(self.id, vid, att.get("connection_info"))
            self.rbdio.connect(str(att["connection_info"].get("auth_username") or ""))
            self.api.request("POST", f"/attachments/{aid}/action", MV_COMPLETE,
                             {"os-complete": None}, what=f"completing attachment of {vid}")
        except BaseException:
            self.detach(aid)
            raise
        return aid, spec

    def detach(self, aid: str, strict: bool = False) -> None:
        """Delete an attachment; failures are logged (``strict``: raised)."""
        status, data = self.api.call("DELETE", f"/attachments/{aid}", MV_ATTACHMENTS,
                                     what=f"detaching {aid}")
        if status in (200, 202, 204, 404):
            return
        err = error_for(status, message(data), f"store {self.id}: detaching attachment {aid}")
        if strict:
            raise err
        log.warning("%s (removed at next mount)", err)

    def _learn_pool(self, v: Mapping[str, Any], spec: tuple[str, str, str]) -> None:
        with self._lock:
            self._pools[str(v.get("os-vol-host-attr:host") or "")] = spec[:2]

    def _acquire(self, vid: str) -> _ReadHandle:
        with self._lock:
            h = self._handles.get(vid)
            if h is not None:
                h.refs += 1
                return h
            lock = self._attach_locks.setdefault(vid, threading.Lock())
        deadline = time.monotonic() + self.wait_budget()
        if not lock.acquire(timeout=self.lock_wait()):
            raise BackendError(f"store {self.id}: volume {vid}: still being attached",
                               retryable=True)
        try:
            with self._lock:
                h = self._handles.get(vid)
                if h is not None:
                    h.refs += 1
                    return h
            try:
                v = self.api.volume(vid)
            except NotFound:
                raise Changed(f"store {self.id}: volume {vid} was removed since it was "
                              "opened") from None
            size = self._image_size(v)
            if size is None:
                raise Changed(f"store {self.id}: volume {vid} no longer holds an image "
                              f"(status {v.get('status')})")
            try:
                aid: str | None
                aid, spec = self.attach(vid, "ro", deadline)
            except Busy:
                # Attached elsewhere and not multiattach: read it without an attachment if its
                # RBD image is known (rbd_pool, or a pool seen in this mount's attachments).
                known = self._known_spec(v)
                if known is None:
                    raise
                self.rbdio.connect()
                aid, spec = None, known
            else:
                self._learn_pool(v, spec)
            try:
                image = self.rbdio.open(spec, read_only=True)
                image_id = str(image.id()) if aid is None else ""
            except BaseException:
                if aid is not None:
                    self.detach(aid)
                raise
            h = _ReadHandle(vid, aid, image, size, refs=1, last_used=time.monotonic(),
                            spec=spec, image_id=image_id)
            with self._lock:
                self._handles[vid] = h
            return h
        finally:
            lock.release()
            with self._lock:
                if self._attach_locks.get(vid) is lock and not lock.locked():
                    del self._attach_locks[vid]

    def _release(self, h: _ReadHandle, doom: bool = False) -> None:
        with self._lock:
            h.refs -= 1
            h.last_used = time.monotonic()
            if doom and not h.doomed:
                h.doomed = True
                if self._handles.get(h.vid) is h:
                    del self._handles[h.vid]
            close = h.doomed and h.refs == 0
        if close:
            self._close_handle(h)

    def _close_handle(self, h: _ReadHandle) -> None:
        close_image(h.image)
        if h.attachment is not None:
            self.detach(h.attachment)

    def _known_spec(self, v: Mapping[str, Any]) -> tuple[str, str, str] | None:
        """The RBD image of a volume without attaching it: Cinder's RBD driver names it
        ``volume-<id>`` (``<name_id>`` after a migration) in its pool."""
        with self._lock:
            where = (self.rbd_pool, "") if self.rbd_pool else (
                self._pools.get(str(v.get("os-vol-host-attr:host") or "")) or (
                    next(iter(self._pools.values())) if len(self._pools) == 1 else None))
        if where is None:
            return None
        return where[0], where[1], "volume-" + str(
            v.get("os-vol-mig-status-attr:name_id") or v["id"])

    def _drop(self, vid: str) -> None:
        """Close this store's handle on ``vid`` (waiting, bounded, for reads in flight)."""
        with self._lock:
            h = self._handles.pop(vid, None)
            if h is None:
                return
            h.doomed = True
        deadline = time.monotonic() + self.lock_wait()
        while True:
            with self._lock:
                if h.refs == 0:
                    break
            if time.monotonic() > deadline:
                raise Busy(f"store {self.id}: volume {vid}: reads still running")
            time.sleep(0.02)
        self._close_handle(h)

    def _reap_loop(self) -> None:
        """Detach volumes nobody read for ``detach_after`` seconds: an attachment keeps the
        volume in-use, which blocks other hosts (and Glance) from attaching or deleting it."""
        interval = min(5.0, max(0.2, self.detach_after / 2))
        while not self._stop.wait(interval):
            self._drop_spare(idle=SPARE_IDLE)
            now = time.monotonic()
            with self._lock:
                idle = [h for h in self._handles.values()
                        if h.refs == 0 and now - h.last_used >= self.detach_after]
                for h in idle:
                    del self._handles[h.vid]
                    h.doomed = True
            for h in idle:
                try:
                    self._close_handle(h)
                except Exception as e:
                    log.warning("store %s: detaching idle volume %s: %s", self.id, h.vid, e)

    def adopt(self, vid: str, attachment: str, image: Any, size: int) -> None:
        """A just-published upload's attachment and Image become the read handle of the new
        image: reading it back right away needs no attach (detached after ``detach_after``)."""
        h = _ReadHandle(vid, attachment, image, size, last_used=time.monotonic())
        with self._lock:
            old = self._handles.get(vid)
            if old is None and not self._stop.is_set():
                self._handles[vid] = h
                return
        self._close_handle(h)

    # ------------------------------------------------------------------ spare upload volume
    def take_spare(self) -> tuple[str, str, float, str, tuple[str, str, str]] | None:
        """The upload volume made ahead (name, id, created, attachment, RBD spec), or None.

        One still being made is waited for: it is further along than a new one would be."""
        deadline = time.monotonic() + self.wait_budget() / 2
        with self._spare_ready:
            while self._spare is None and self._preparing and time.monotonic() < deadline:
                self._spare_ready.wait(0.1)
            spare, self._spare = self._spare, None
            self._spare_used = time.monotonic()
        return spare

    def prepare_spare(self) -> None:
        """Start making the next upload's volume (created, attached rw) in the background.

        Creating and attaching take ~1-2 s of Cinder work (scheduler, RBD, connection):
        paid while this upload is written instead of when the next one starts. At most one
        spare exists; it is hidden like any upload (a crash leaves it to cleanup_leftovers)
        and removed after SPARE_IDLE seconds without uploads, and at unmount.
        """
        if not self.prepare_volumes:
            return
        with self._lock:
            if self._spare is not None or self._preparing or self._stop.is_set():
                return
            self._preparing = True
        threading.Thread(target=self._make_spare, daemon=True,
                         name=f"cinder-{self.id}-spare").start()

    def _make_spare(self) -> None:
        name, vid, aid = self.hidden_name(), None, None
        try:
            deadline = time.monotonic() + self.wait_budget()
            vid, created = self.create_volume(name, 1, deadline)
            aid, spec = self.attach(vid, "rw", deadline)
            with self._lock:
                if not self._stop.is_set() and self._spare is None:
                    self._spare = (name, vid, created, aid, spec)
                    self._spare_used = time.monotonic()
                    vid = aid = None
        except Exception as e:
            log.info("store %s: could not prepare the next upload volume: %s", self.id, e)
        finally:
            try:
                self._discard_volume(vid, aid)  # not kept (failed, or the store is closing)
            finally:
                with self._spare_ready:
                    self._preparing = False
                    self._spare_ready.notify_all()

    def _discard_volume(self, vid: str | None, aid: str | None) -> None:
        if aid is not None:
            self.detach(aid)
        if vid is not None:
            try:
                self.delete_volume(vid, wait=False)
            except StoreError as e:
                log.warning("store %s: could not remove upload volume %s: %s (removed at next "
                            "mount)", self.id, vid, e)

    def _drop_spare(self, idle: float = 0.0) -> None:
        """Remove the spare volume (only if unused for ``idle`` seconds)."""
        with self._lock:
            spare = self._spare
            if spare is None or time.monotonic() - self._spare_used < idle:
                return
            self._spare = None
        self._discard_volume(spare[1], spare[3])

    # ------------------------------------------------------------------ reading
    def read_range(self, name: str, version: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise BackendError(f"{self.id}/{name}: bad range {offset}+{length}")
        h = self._acquire(version)
        doom = False
        try:
            n = max(0, min(length, h.size - offset))
            try:
                data = h.image.read(offset, n) if n else b""
            except Exception as e:
                doom = True
                err = rbd_error(e, f"{self.id}/{name}: read at {offset}")
                raise (Changed(str(err)) if isinstance(err, NotFound) else err) from None
            if len(data) != n:
                doom = True
                raise BackendError(f"{self.id}/{name}: short read at {offset}: {len(data)} of "
                                   f"{n} bytes")
            if h.attachment is None and self.rbdio.image_id(h.spec) != h.image_id:
                # No attachment of ours keeps the volume from being deleted, and librbd reads
                # zeros from a handle on a removed image: only a name that still refers to
                # this image, checked after the read, proves the bytes are this version's.
                doom = True
                raise Changed(f"{self.id}/{name}: volume {version} was removed while read")
            return data
        finally:
            self._release(h, doom)

    # ------------------------------------------------------------------ writing
    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnly(f"store {self.id} is read-only")

    def upload(self, name: str, size_hint: int | None = None) -> Upload:
        from imagefs.stores.cinder.upload import CinderUpload

        self._writable()
        check_name(name)
        return CinderUpload(self, name, size_hint)

    def volume_meta(self, size: int, meta: Mapping[str, str]) -> dict[str, str]:
        """The whole metadata of a published imagefs volume."""
        out = {f"{META_PREFIX}{k}": v for k, v in user_meta(meta).items()}
        out.update(self.match)
        out[IMAGE_SIZE] = str(size)
        return out

    @staticmethod
    def _named_meta(meta: Mapping[str, str], name: str) -> dict[str, str]:
        """``meta`` (user metadata only) with the exact-name key as file name ``name`` needs."""
        out = {k: v for k, v in meta.items() if k not in ADMIN_KEYS and k != NAME_KEY}
        if cinder_name(name) != name:
            out[NAME_KEY] = name
        return out

    def hidden_name(self) -> str:
        """A new upload volume name: hidden, and naming its owner for cleanup_leftovers."""
        return f"{HIDDEN_PREFIX}{new_owner_id()}"

    def create_volume(self, name: str, gib: int, deadline: float) -> tuple[str, float]:
        """Create a volume and wait until it is available: (id, created_at)."""
        spec: dict[str, Any] = {"size": gib, "name": name, "metadata": dict(self.match)}
        if self.volume_type:
            spec["volume_type"] = self.volume_type
        body = self.api.request("POST", "/volumes", body={"volume": spec}, ok=(202,),
                                what=f"creating a {gib} GiB upload volume {name}")
        vid = str(body["volume"]["id"])
        try:
            v = self.api.wait_volume(vid, lambda v: v.get("status") == "available",
                                     "creating", deadline)
        except BaseException:
            try:
                self.delete_volume(vid, wait=False)
            except StoreError as e:
                log.warning("store %s: could not remove volume %s: %s", self.id, vid, e)
            raise
        return vid, _epoch(v.get("created_at")) or time.time()

    def delete_volume(self, vid: str, wait: bool, what: str = "") -> None:
        """DELETE (retried while the volume is in a passing state); ``wait``: until 404."""
        what = what or f"volume {vid}"
        deadline = time.monotonic() + self.wait_budget()
        delay = 0.05
        while True:
            status, data = self.api.call("DELETE", f"/volumes/{vid}", what=f"deleting {what}")
            if status in (202, 204, 404):
                break
            err = error_for(status, message(data), f"store {self.id}: deleting {what}")
            if status == 400 and time.monotonic() < deadline:
                try:
                    v = self.api.volume(vid)
                except NotFound:
                    return
                if v.get("status") in TRANSIENT:
                    time.sleep(delay)
                    delay = min(delay * 1.5, 0.5)
                    continue
                if v.get("attachments"):
                    raise Busy(f"store {self.id}: {what} is attached ({err.args[0]})")
            raise err
        if wait:
            try:
                self.api.wait_volume(vid, lambda v: False, "deleting", deadline)
            except NotFound:
                return

    def _refuse_readonly(self, v: Mapping[str, Any], name: str, what: str) -> None:
        """ReadOnly (and a log line saying how to allow it) for a read-only volume."""
        if _readonly(v):
            log.warning("store %s: %s is read-only volume %s in Cinder (Glance marks finished "
                        "images read-only): not %s it; `cinder readonly-mode-update %s false` "
                        "allows it", self.id, name, v["id"], what, v["id"])
            raise ReadOnly(f"{self.id}/{name}: volume {v['id']} is read-only in Cinder")

    def _check_replaceable(self, v: Mapping[str, Any], name: str, what: str) -> None:
        """ReadOnly or Busy if the image's volume must not be replaced or deleted."""
        self._refuse_readonly(v, name, what)
        others = self._foreign_attachments(v, imagefs_too=True)
        if others:
            hosts = ", ".join(str(a.get("host_name") or a.get("server_id")) for a in others[:5])
            log.warning("store %s: %s (volume %s) is attached by %s: not %s it", self.id, name,
                        v["id"], hosts, what)
            raise Busy(f"{self.id}/{name}: volume {v['id']} is in use ({hosts})")

    def publish(self, vid: str, name: str, meta: dict[str, str] | None) -> dict[str, Any]:
        """Give volume ``vid`` the name (and, if given, its whole metadata) in one PUT,
        replacing the image that has that name now (see the module docstring)."""
        olds = [v for v, _ in self._pick(self._named(name)).values() if v["id"] != vid]
        for v in olds:
            self._check_replaceable(v, name, "replacing")
        tagged = []
        try:
            for v in olds:
                self.api.request("POST", f"/volumes/{v['id']}/metadata",
                                 body={"metadata": {REPLACED_KEY: vid}},
                                 what=f"marking {name} ({v['id']}) as being replaced")
                tagged.append(v)
            update: dict[str, Any] = {"name": cinder_name(name)}
            if meta is not None:
                update["metadata"] = self._named_meta(meta, name)  # replaces all of it
            try:
                new = self.api.request("PUT", f"/volumes/{vid}", body={"volume": update},
                                       what=f"publishing {name}")["volume"]
            except StoreError:
                try:  # a PUT that timed out may still have happened
                    new = self.api.volume(vid)
                except StoreError:
                    raise
                if self._display(new) != name:
                    raise
        except BaseException:
            for v in tagged:
                self._untag(v["id"])
            raise
        for v in olds:
            try:
                self._drop(v["id"])
                self.delete_volume(v["id"], wait=False, what=f"{name}'s old volume {v['id']}")
            except StoreError as e:
                log.warning("store %s: replaced %s but could not remove its old volume %s: %s "
                            "(hidden; removed at next mount)", self.id, name, v["id"], e)
        return dict(new)

    def _untag(self, vid: str) -> None:
        status, data = self.api.call("DELETE", f"/volumes/{vid}/metadata/{REPLACED_KEY}",
                                     what=f"untagging {vid}")
        if status not in (200, 204, 404):
            log.warning("store %s: could not remove %s from volume %s: HTTP %s %s (removed at "
                        "next mount)", self.id, REPLACED_KEY, vid, status, message(data))

    def rename(self, old: str, new: str) -> ImageInfo:
        self._writable()
        check_name(new)
        v, size = self._resolve(old)
        if old != new:
            self._refuse_readonly(v, old, "renaming")
            meta = _meta(v)
            # The name alone, unless the exact-name key must change with it (then the whole
            # metadata, in the same PUT).
            full = NAME_KEY in meta or cinder_name(new) != new
            v = self.publish(str(v["id"]), new, meta if full else None)
        return self._info(new, v, size)

    def delete(self, name: str) -> None:
        self._writable()
        v, _ = self._resolve(name)
        vid = str(v["id"])
        self._drop(vid)
        v = self.api.volume(vid)  # after our own detach
        self._check_replaceable(v, name, "deleting")
        self._check_watchers(v, name)
        self.delete_volume(vid, wait=True, what=f"{name} (volume {vid})")

    def _check_watchers(self, v: Mapping[str, Any], name: str) -> None:
        """Busy if a librbd client has the image open read-write without an attachment."""
        spec = self._known_spec(v)
        if spec is None or self.rbdio.cluster is None:
            return  # RBD image unknown (nothing attached yet): Cinder's own checks only
        try:
            watchers = self.rbdio.watchers(spec)
        except NotFound:
            return
        if watchers:
            log.warning("store %s: %s (volume %s) is open in librbd by %s: not deleting it",
                        self.id, name, v["id"], ", ".join(watchers[:5]))
            raise Busy(f"{self.id}/{name}: RBD image {spec[2]} is in use ({len(watchers)} "
                       "watchers)")

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
        v = {**v, "metadata": body.get("metadata", {**_meta(v), **stored})}
        return self._info(name, v, size)

    def location(self, name: str) -> str:
        v, _ = self._resolve(name)
        return f"cinder://{self.id}/{v['id']}"

    # ------------------------------------------------------------------ housekeeping
    def _dead(self, owner: str, since: Any) -> bool:
        """True if the imagefs process ``owner`` (an owner id) is gone: on this host, its
        process no longer runs; elsewhere, ``since`` (an ISO time) is older than leftover_age."""
        state = owner_state(owner)
        if state != "elsewhere":
            return state == "dead"
        t = _epoch(since)
        return self.leftover_age > 0 and t > 0 and time.time() - t > self.leftover_age

    def cleanup_leftovers(self) -> int:
        """Remove uploads and read attachments of dead imagefs processes; finish or undo
        replacements a crash cut short."""
        if self.read_only:
            return 0
        volumes = list(self.api.volumes())
        by_id = {str(v["id"]): v for v in volumes}
        done = 0
        for v in volumes:
            vid, name = str(v["id"]), str(v.get("name") or "")
            try:
                for a in v.get("attachments") or []:
                    host = str(a.get("host_name") or "")
                    if host.startswith(CONNECTOR_PREFIX) and host != self.connector_host \
                            and self._dead(host[len(CONNECTOR_PREFIX):], a.get("attached_at")):
                        self.detach(str(a["attachment_id"]), strict=True)
                        log.info("store %s: removed attachment of a dead imagefs on volume %s",
                                 self.id, vid)
                        done += 1
                if is_hidden(name):
                    if self._dead(name[len(HIDDEN_PREFIX):], v.get("created_at")):
                        # Every attachment of an upload volume is its writer's; one cut short
                        # (status attaching) is not in the volume's own list.
                        for aid in self._attachment_ids(vid):
                            self.detach(aid, strict=True)
                        self.delete_volume(vid, wait=False, what=f"leftover upload {name}")
                        log.info("store %s: removed leftover upload volume %s (%s)", self.id,
                                 name, vid)
                        done += 1
                    continue
                by = _meta(v).get(REPLACED_KEY)
                if by is None:
                    continue
                repl = by_id.get(by)
                if repl is not None and self._display(repl) == self._display(v):
                    if not _readonly(v) and not self._foreign_attachments(v, imagefs_too=True):
                        self._drop(vid)
                        self.delete_volume(vid, wait=False, what=f"replaced volume {vid}")
                        log.info("store %s: removed volume %s, replaced by %s", self.id, vid, by)
                        done += 1
                elif repl is None or not is_hidden(str(repl.get("name") or "")):
                    self._untag(vid)  # that replacement never happened (or is gone)
                    done += 1
            except StoreError as e:
                log.warning("store %s: could not clean up volume %s (%s): %s", self.id, vid,
                            name, e)
        return done

    def _attachment_ids(self, vid: str) -> list[str]:
        """Every attachment of a volume, reserved and attaching ones included."""
        body = self.api.request("GET", f"/attachments?volume_id={vid}", MV_ATTACHMENTS,
                                what=f"attachments of {vid}")
        return [str(a["id"]) for a in body.get("attachments") or []]

    def usage(self) -> tuple[int, int] | None:
        images = list(self.list())
        return len(images), sum(i.size for i in images)

    def properties(self) -> dict[str, str]:
        o = self.options
        props = {"auth": o["auth"], "volume_type": self.volume_type,
                 "glance_volumes": "true" if self.glance_volumes else "false"}
        if o["auth"] == "noauth":
            props.update(endpoint=o["endpoint"], project_id=o["project_id"])
        else:
            props.update(auth_url=o["auth_url"], project=o.get("project") or o["project_id"])
            if o.get("endpoint"):
                props["endpoint"] = o["endpoint"]
        return props


