"""What a crash leaves in the pool, and putting it right at the next mount.

A killed upload leaves its hidden image ``.imagefs-<owner id>``; a replace killed between its
steps (``replace.py``) leaves the old image moved aside as ``.imagefs-<owner id>-old``, tagged
``imagefs.restore_name`` until the new image has the name. ``cleanup_leftovers`` judges each by
its owner (``owners.condemned``: this host's dead processes at once, other hosts' after
``leftover_age``), renames tagged aside images back if their name is free, and removes the rest.
Other hosts' aside images are judged by ``aside_at`` (when they were moved aside), not by their
creation time: the image itself may be years old.

librbd renames in several RADOS writes (the new id object, the directory, then the old id
object removed), so a kill inside librbd's own rename can leave ``rbd_id.<name>`` without a
directory entry: it only blocks the name, and the restore removes it (``_drop_stale_id``).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from imagefs.stores.base import NotFound, StoreError, is_hidden
from imagefs.stores.owners import condemned
from imagefs.stores.rbd.cluster import close_image
from imagefs.stores.rbd.layout import ASIDE_KEY, OLD_SUFFIX, RESTORE_KEY, owner_of, timestamp

if TYPE_CHECKING:
    from imagefs.stores.rbd.store import RbdStore

log = logging.getLogger(__name__)


class Leftovers:
    """Crash recovery for one store (run once, at mount)."""

    def __init__(self, store: RbdStore) -> None:
        self.store = store
        self.client = store.client

    def cleanup(self) -> int:
        """Remove uploads of dead writers; put back images a crash left moved aside."""
        store = self.store
        done = 0
        for name, _id in self.client.entries():
            if not is_hidden(name):
                continue
            try:
                if not self._condemned(name):
                    continue
                if name.endswith(OLD_SUFFIX) and self._restore(name):
                    done += 1
                    continue
                store.replacer.remove(name)
                done += 1
                log.info("store %s: removed leftover image %s", store.id, name)
            except StoreError as e:
                log.warning("store %s: could not clean up leftover image %s: %s",
                            store.id, name, e)
        return done

    def _condemned(self, name: str) -> bool:
        """Whether the upload/aside image ``name`` belongs to a writer that is gone."""
        try:
            image = self.client.open_image(name)
        except NotFound:
            return False
        try:
            since = None
            if name.endswith(OLD_SUFFIX):
                try:  # moved aside at: the image itself may be years old
                    since = float(image.metadata_get(ASIDE_KEY))
                except Exception:
                    since = None  # moved aside by an older imagefs: only its age is known
            if since is None:
                since = timestamp(image.create_timestamp())
        finally:
            close_image(image)
        return condemned(owner_of(name), time.time() - since, self.store.opts.leftover_age)

    def _restore(self, aside: str) -> bool:
        """Rename an image moved aside by a crashed replace back, if its name is free."""
        client = self.client
        image = client.open_image(aside)
        try:
            target = image.metadata_get(RESTORE_KEY)
        except Exception:
            return False
        finally:
            close_image(image)
        for attempt in range(2):
            try:
                client.rename(aside, target)
                break
            except client.rbd.ImageExists:
                if attempt or not self._drop_stale_id(target):
                    return False  # the replacement was published: the old one is garbage
            except Exception as e:
                raise client.err(e, f"{self.store.id}: restoring {target}") from None
        self.store.replacer.clear_tags(target, None)
        log.warning("store %s: restored %s, left moved aside by a crash during a replace",
                    self.store.id, target)
        return True

    def _drop_stale_id(self, name: str) -> bool:
        """Remove ``rbd_id.<name>`` if no image of that name is in the pool's directory.

        A process killed inside librbd's rename (module docstring) leaves an id object that
        only blocks the name: the directory lists the image under the other name, and a
        rename back fails with "exists". Seen killing a daemon mid-replace: the old image's
        restore failed that way and the image was then removed as garbage. A rename in
        progress in another live client has the same look for a moment, so the directory is
        read twice, a second apart. Returns True if it removed one."""
        client = self.client

        def listed() -> bool:
            return any(e["name"] == name for e in client.rbd.RBD().list2(client.conn()))

        try:
            if listed():
                return False
            time.sleep(1.0)
            if listed():
                return False
            client.conn().remove_object("rbd_id." + name)
        except Exception as e:
            raise client.err(e, f"{self.store.id}/{name}: removing a stale id object") from None
        log.warning("store %s: removed rbd_id.%s, left without its image by a rename that was "
                    "cut short", self.store.id, name)
        return True
