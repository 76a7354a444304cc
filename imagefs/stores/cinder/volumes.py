"""The life cycle of a volume and its attachments: create, attach, detach, delete.

Attachments use Cinder's attachments API: create with a connector and a mode (``ro``/``rw``,
3.54), then complete (3.44), which makes the volume in-use; delete (3.27) detaches. The
connector's host is ``imagefs_<owner id>``: it names the imagefs process, so the next mount can
tell a crashed process's attachments (``leftovers.py``). A volume that is not multiattach can
have one attachment at a time: attaching one attached elsewhere is ``Busy``.

Creating, attaching and deleting meet passing states (creating, attaching, detaching...):
each waits and tries again until its deadline, bounded below the store timeout.
"""

from __future__ import annotations

import logging
import platform
import re
import time
from collections.abc import Callable
from typing import Any

from imagefs.stores.base import HIDDEN_PREFIX, Busy, NotFound, StoreError
from imagefs.stores.cinder.api import (
    MV_ATTACH,
    MV_ATTACHMENTS,
    MV_COMPLETE,
    ApiError,
    CinderApi,
    error_for,
    message,
)
from imagefs.stores.cinder.layout import TRANSIENT, epoch
from imagefs.stores.cinder.rbdio import RbdAccess, rbd_spec
from imagefs.stores.owners import new_owner_id

log = logging.getLogger(__name__)

_CURRENT = re.compile(r"current status is ([\w-]+)")


def hidden_name() -> str:
    """A new upload volume name: hidden, and naming its owner for cleanup_leftovers."""
    return f"{HIDDEN_PREFIX}{new_owner_id()}"


class Volumes:
    """Volume and attachment calls of one store. ``wait_budget()`` is how long one call may
    wait for Cinder to finish something."""

    def __init__(self, store_id: str, api: CinderApi, rbdio: RbdAccess, connector_host: str,
                 volume_type: str, match: dict[str, str], wait_budget: Callable[[], float]
                 ) -> None:
        self.store_id = store_id
        self.api = api
        self.rbdio = rbdio
        self.connector_host = connector_host
        self.volume_type = volume_type
        self.match = match
        self.wait_budget = wait_budget

    def create(self, name: str, gib: int, deadline: float) -> tuple[str, float]:
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
                self.delete(vid, wait=False)
            except StoreError as e:
                log.warning("store %s: could not remove volume %s: %s", self.store_id, vid, e)
            raise
        return vid, epoch(v.get("created_at")) or time.time()

    def delete(self, vid: str, wait: bool, what: str = "") -> None:
        """DELETE (retried while the volume is in a passing state); ``wait``: until 404."""
        what = what or f"volume {vid}"
        deadline = time.monotonic() + self.wait_budget()
        delay = 0.05
        while True:
            status, data = self.api.call("DELETE", f"/volumes/{vid}", what=f"deleting {what}")
            if status in (202, 204, 404):
                break
            err = error_for(status, message(data), f"store {self.store_id}: deleting {what}")
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
                    raise Busy(f"store {self.store_id}: {what} is attached ({err.args[0]})")
            raise err
        if wait:
            try:
                self.api.wait_volume(vid, lambda v: False, "deleting", deadline)
            except NotFound:
                return

    def discard(self, vid: str | None, aid: str | None) -> None:
        """Detach and delete an unpublished upload volume (best effort: cleanup at next
        mount)."""
        if aid is not None:
            self.detach(aid)
        if vid is not None:
            try:
                self.delete(vid, wait=False)
            except StoreError as e:
                log.warning("store %s: could not remove upload volume %s: %s (removed at next "
                            "mount)", self.store_id, vid, e)

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
            err = error_for(status, message(data),
                            f"store {self.store_id}: attaching volume {vid}")
            if isinstance(err, ApiError) and status == 400:
                m = _CURRENT.search(err.message)
                current = m.group(1) if m else ""
                if current in TRANSIENT and time.monotonic() < deadline:
                    time.sleep(delay)
                    delay = min(delay * 1.5, 0.5)
                    continue
                if current == "in-use":
                    raise Busy(f"store {self.store_id}: volume {vid} is attached elsewhere and "
                               "is not multiattach (use a multiattach volume_type for images "
                               f"read from several hosts at once): {err.message}")
            raise err
        att = data["attachment"]
        aid = str(att["id"])
        try:
            spec = rbd_spec(self.store_id, vid, att.get("connection_info"))
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
        err = error_for(status, message(data),
                        f"store {self.store_id}: detaching attachment {aid}")
        if strict:
            raise err
        log.warning("%s (removed at next mount)", err)

    def attachment_ids(self, vid: str) -> list[str]:
        """Every attachment of a volume, reserved and attaching ones included."""
        body = self.api.request("GET", f"/attachments?volume_id={vid}", MV_ATTACHMENTS,
                                what=f"attachments of {vid}")
        return [str(a["id"]) for a in body.get("attachments") or []]
