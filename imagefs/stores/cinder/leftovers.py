"""What a crash leaves in Cinder, and putting it right at the next mount.

A crash leaves hidden volumes (uploads, a spare), attachments, or a volume tagged
``imagefs-replaced-by``. ``cleanup_leftovers`` removes hidden volumes and attachments of dead
imagefs processes (``owners.condemned``: this host, the process is gone; other hosts, older
than ``leftover_age``; the connector host ``imagefs_<owner id>`` names the process), deletes
tagged volumes whose replacement has their name, and untags the others.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

from imagefs.stores.base import HIDDEN_PREFIX, StoreError, is_hidden
from imagefs.stores.cinder.layout import CONNECTOR_PREFIX, REPLACED_KEY, epoch, meta_of, readonly
from imagefs.stores.owners import condemned

if TYPE_CHECKING:
    from imagefs.stores.cinder.store import CinderStore

log = logging.getLogger(__name__)


class Leftovers:
    """Crash recovery for one store (run once, at mount)."""

    def __init__(self, store: CinderStore) -> None:
        self.store = store

    def _condemned(self, owner: str, since: Any) -> bool:
        """Whether the imagefs process ``owner`` (an owner id) is gone; ``since`` (an ISO
        time) is how old its leftover is. A leftover of unknown age is never condemned by
        age."""
        t = epoch(since)
        age = time.time() - t if t > 0 else -math.inf
        return condemned(owner, age, self.store.opts.leftover_age)

    def cleanup(self) -> int:
        """Remove uploads and read attachments of dead imagefs processes; finish or undo
        replacements a crash cut short."""
        store = self.store
        volumes = list(store.api.volumes())
        by_id = {str(v["id"]): v for v in volumes}
        done = 0
        for v in volumes:
            vid, name = str(v["id"]), str(v.get("name") or "")
            try:
                for a in v.get("attachments") or []:
                    host = str(a.get("host_name") or "")
                    if host.startswith(CONNECTOR_PREFIX) and host != store.connector_host \
                            and self._condemned(host[len(CONNECTOR_PREFIX):],
                                                a.get("attached_at")):
                        store.volumes.detach(str(a["attachment_id"]), strict=True)
                        log.info("store %s: removed attachment of a dead imagefs on volume %s",
                                 store.id, vid)
                        done += 1
                if is_hidden(name):
                    if self._condemned(name[len(HIDDEN_PREFIX):], v.get("created_at")):
                        # Every attachment of an upload volume is its writer's; one cut short
                        # (status attaching) is not in the volume's own list.
                        for aid in store.volumes.attachment_ids(vid):
                            store.volumes.detach(aid, strict=True)
                        store.volumes.delete(vid, wait=False, what=f"leftover upload {name}")
                        log.info("store %s: removed leftover upload volume %s (%s)", store.id,
                                 name, vid)
                        done += 1
                    continue
                by = meta_of(v).get(REPLACED_KEY)
                if by is None:
                    continue
                repl = by_id.get(by)
                layout = store.layout
                if repl is not None and layout.display(repl) == layout.display(v):
                    if not readonly(v) and not layout.foreign_attachments(v, imagefs_too=True):
                        store.readers.drop(vid)
                        store.volumes.delete(vid, wait=False, what=f"replaced volume {vid}")
                        log.info("store %s: removed volume %s, replaced by %s", store.id, vid,
                                 by)
                        done += 1
                elif repl is None or not is_hidden(str(repl.get("name") or "")):
                    store.replacer.untag(vid)  # that replacement never happened (or is gone)
                    done += 1
            except StoreError as e:
                log.warning("store %s: could not clean up volume %s (%s): %s", store.id, vid,
                            name, e)
        return done
