"""Giving an image a name, replacing the image that has it; removing images imagefs may remove.

Replacing an existing image (commit or rename onto an existing name)
    RBD cannot rename over an existing image, so replacement is three steps:
    (1) tag the old image with ``imagefs.restore_name`` and ``imagefs.aside_at`` (the time) and
    rename it to a hidden ``...-old`` name; (2) rename the new image to the name and remove the
    ``restore_name`` tag from the old one; (3) delete the old one. If (2) fails the old image is
    renamed back. After any failed rename, ``rbd_id.<name>`` of both names is read again before
    anything is rolled back or removed (a rename that timed out may have happened). A crash
    between (1) and (2) leaves the old image hidden but intact, and ``cleanup_leftovers``
    (``leftovers.py``) renames it back (the tag says where) if the name is still free; a crash
    after (2) leaves an untagged hidden old image that cleanup deletes. So a crash never loses
    the published image, and no reader ever sees a partial one; the price is a short window
    between (1) and (2) where a fresh lookup by another client finds no image. The alternative
    order (new in first) is impossible without an atomic rename-over.

Refusals
    An image that imagefs could not remove afterwards is refused in step (1), before anything
    is renamed, and never deleted either: ``Busy`` (EBUSY) and a log line, when a snapshot has
    clones, when it has snapshots other than ``snap``, or (replace only) when another client
    watches it (a VM, ``rbd map``).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

from imagefs.stores.base import BackendError, Busy, NotFound, StoreError
from imagefs.stores.rbd.cluster import Client, close_image
from imagefs.stores.rbd.layout import ASIDE_KEY, RESTORE_KEY, SNAP, aside_name

log = logging.getLogger(__name__)

#: Attempts at publishing when another client publishes the same name at the same moment.
PUBLISH_TRIES = 5


class Replacer:
    """The replace protocol of one store. ``forget(name)`` drops cached facts of a name."""

    def __init__(self, store_id: str, client: Client, timeout: float,
                 forget: Callable[[str], None]) -> None:
        self.store_id = store_id
        self.client = client
        self.timeout = timeout
        self._forget = forget

    # ------------------------------------------------------------------ refusals
    def _check_no_clones(self, name: str, image: Any) -> None:
        """Busy if any snapshot of ``image`` has clones: they would lose their parent."""
        for snap in image.list_snaps():
            try:
                image.set_snap(snap["name"])
                children = list(image.list_children2())
            finally:
                image.set_snap(None)
            if children:
                which = ", ".join(
                    f"{c.get('pool', '?')}/{c.get('image', '?')}" for c in children[:5])
                log.warning("store %s: %s has clones of snapshot %s (%s): refusing to remove "
                            "or replace it", self.store_id, name, snap["name"], which)
                raise Busy(f"{self.store_id}/{name}: snapshot {snap['name']} has clones "
                           f"({which})")

    def _foreign_snaps(self, name: str, image: Any) -> None:
        """Busy if ``image`` has snapshots imagefs did not make (only ``snap`` is ours)."""
        others = [s["name"] for s in image.list_snaps() if s["name"] != SNAP]
        if others:
            log.warning("store %s: %s has snapshots %s not made by imagefs: not removing or "
                        "replacing it", self.store_id, name, ", ".join(others[:5]))
            raise Busy(f"{self.store_id}/{name} has snapshots: {', '.join(others[:5])}")

    def remove(self, name: str) -> None:
        """Remove an image and imagefs's ``snap``; never one with clones or other snapshots.

        Everything that can refuse is checked before anything is changed.
        """
        client = self.client
        image = client.open_image(name, read_only=False)
        try:
            self._check_no_clones(name, image)
            self._foreign_snaps(name, image)
            if any(s["name"] == SNAP for s in image.list_snaps()):
                if image.is_protected_snap(SNAP):
                    image.unprotect_snap(SNAP)
                image.remove_snap(SNAP)
        except StoreError:
            raise
        except Exception as e:
            raise client.err(e, f"{self.store_id}/{name}: removing snapshot") from None
        finally:
            close_image(image)
        try:
            client.rbd.RBD().remove(client.conn(), name)
        except Exception as e:
            raise client.err(e, f"{self.store_id}/{name}: remove") from None

    def _prepare_aside(self, dst: str) -> str:
        """Step 1's checks and tags on the image at ``dst``; returns its id.

        Busy if it must not be replaced: clones of a snapshot, snapshots imagefs did not make
        (it could not remove the old image afterwards), or watchers (a VM or ``rbd map`` uses
        it: removal would fail the same way). Read-only opens, like imagefs's, do not watch.
        """
        client = self.client
        image = client.open_image(dst, read_only=False)
        try:
            self._check_no_clones(dst, image)
            self._foreign_snaps(dst, image)
            mine = str(client.cluster.get_addrs())  # our own read-write opens (this one too)
            # Another host replacing it at the same moment watches it while it runs this
            # very check (a read-write open): both refused, and neither image was published.
            # A VM's watch stays; that one goes within moments. Look again, at random times.
            patience = time.monotonic() + self.timeout / 4
            while watchers := [w for w in image.watchers_list()
                               if str(w.get("addr")) not in mine]:
                if time.monotonic() > patience:
                    log.warning("store %s: %s is in use (watched by %s): not replacing it",
                                self.store_id, dst,
                                ", ".join(str(w.get("addr")) for w in watchers[:5]))
                    raise Busy(f"{self.store_id}/{dst} is in use ({len(watchers)} watchers)")
                close_image(image)
                time.sleep(random.uniform(0.05, 0.5))
                image = client.open_image(dst, read_only=False)
            image.metadata_set(ASIDE_KEY, repr(time.time()))
            image.metadata_set(RESTORE_KEY, dst)
            return str(image.id())
        except StoreError:
            raise
        except Exception as e:
            raise client.err(e, f"{self.store_id}/{dst}: preparing replacement") from None
        finally:
            close_image(image)

    # ------------------------------------------------------------------ the protocol
    def publish(self, src: str, dst: str, src_id: str | None = None) -> None:
        """Give image ``src`` the name ``dst``, replacing an image there (module docstring).

        After any failed rename the names are looked up again (``rbd_id.<name>``) before
        anything is rolled back or removed: a rename that timed out may have happened.
        """
        client = self.client
        rbd = client.rbd
        if src_id is None:
            src_id = client.image_id(src)
        for _ in range(PUBLISH_TRIES):
            try:
                client.rename(src, dst)
                self._forget(dst)
                return
            except rbd.ImageExists:
                pass
            except Exception as e:
                if client.id_or_none(dst) == src_id:
                    self._forget(dst)
                    return  # it did happen
                raise client.err(e, f"{self.store_id}: rename {src} -> {dst}") from None
            if client.id_or_none(dst) == src_id:
                return  # an earlier attempt of ours did happen after all
            aside = aside_name()
            try:
                old_id = self._prepare_aside(dst)
            except NotFound:
                continue  # removed meanwhile: try the plain rename again
            # (1) old image aside
            try:
                client.rename(dst, aside)
            except rbd.ImageNotFound:
                continue
            except Exception as e:
                if client.id_or_none(aside) != old_id:
                    self.clear_tags(dst, old_id)
                    raise client.err(e, f"{self.store_id}: rename {dst} aside") from None
            if client.id_or_none(aside) != old_id:
                # Another client replaced dst between our checks and the rename: what we moved
                # aside was not checked. Put it back and start over.
                self._put_back(aside, dst)
                continue
            # (2) new image in
            try:
                client.rename(src, dst)
            except Exception as e:
                now = client.id_or_none(dst)
                if now != src_id:
                    if now is None:
                        self._put_back(aside, dst)
                    else:
                        log.error("store %s: %s was published by someone else during a "
                                  "replace; the old image %s is left for cleanup",
                                  self.store_id, dst, aside)
                    raise client.err(e, f"{self.store_id}: rename {src} -> {dst}") from None
            self._forget(dst)
            # (3) the old image: untagged at once (a crash must not bring it back), then gone
            self.clear_tags(aside, old_id, restore_only=True)
            try:
                self.remove(aside)
            except StoreError as e:
                log.warning("store %s: replaced %s but could not remove its old image %s: %s",
                            self.store_id, dst, aside, e)
            return
        raise BackendError(f"{self.store_id}/{dst}: other clients kept replacing it; gave up")

    def _put_back(self, aside: str, dst: str) -> None:
        """Undo step 1 (best effort: cleanup at the next mount restores it otherwise)."""
        try:
            self.client.rename(aside, dst)
        except Exception as e:
            log.error("store %s: could not put %s back after a failed replace (%s); it is kept "
                      "as %s and restored at next mount", self.store_id, dst, e, aside)
            return
        self.clear_tags(dst, None)

    def clear_tags(self, name: str, image_id: str | None, restore_only: bool = False) -> None:
        """Remove the replace tags from image ``name`` (if it still is ``image_id``)."""
        try:
            image = self.client.open_image(name, read_only=False)
        except StoreError as e:
            log.debug("%s/%s: removing replace tags: %s", self.store_id, name, e)
            return
        try:
            if image_id is not None and image.id() != image_id:
                return
            for key in (RESTORE_KEY,) if restore_only else (RESTORE_KEY, ASIDE_KEY):
                try:
                    image.metadata_remove(key)
                except Exception as e:
                    log.debug("%s/%s: removing %s: %s", self.store_id, name, key, e)
        except Exception as e:
            log.debug("%s/%s: removing replace tags: %s", self.store_id, name, e)
        finally:
            close_image(image)
