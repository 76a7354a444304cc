"""How images sit in the pool: names, imagefs's metadata keys, Glance's snapshot and location.

Names
    A published image has the file's name. An upload is a hidden image ``.imagefs-<owner id>``
    (see ``owners.py``); an image moved aside during a replace is ``.imagefs-<owner id>-old``.
    The owner id is what tells the next mount a crashed writer's leftovers from a live one's.

Metadata
    imagefs's per-image facts (mtime, mode, hashes) are RBD image metadata ``imagefs.<key>``
    (``conf_*`` keys would be librbd config). ``imagefs.restore_name`` and
    ``imagefs.aside_at`` are the replace protocol's tags (``replace.py``), never user metadata.

Versions
    ``version`` is the RBD image id: every upload is a new image, so new bytes mean a new id,
    while renames and metadata changes keep it. Bytes written in place by other tools (``rbd map``
    + dd) are not seen as a change: Glance treats images as immutable, and so does this store.

Locations
    ``rbd://<fsid>/<pool>/<image>/snap``, exactly what Glance records (each part
    percent-encoded, as glance_store decodes them), for every image that has the snapshot
    ``snap`` Glance reads: all images a glance_layout store publishes, and the images Glance
    wrote, whatever this store's glance_layout. glance_store parses only 1 or 4 components
    (``rbd://<image>`` means "in the pool Glance is configured with", which imagefs cannot vouch
    for), so an image without that snapshot, or any image of a store with a namespace (Glance
    cannot name one), has no Glance location: ``location`` raises ``Unsupported`` saying why.
"""

from __future__ import annotations

import calendar
import time
import urllib.parse
from typing import Any

from imagefs.stores.base import HIDDEN_PREFIX, ImageInfo, meta_mode, meta_mtime
from imagefs.stores.owners import new_owner_id

#: RBD metadata keys imagefs owns: ``imagefs.<key>`` (``conf_*`` keys would be librbd config).
META_PREFIX = "imagefs."
#: On an image moved aside during a replace: the name to give it back after a crash.
RESTORE_KEY = META_PREFIX + "restore_name"
#: On an image moved aside during a replace: when (time.time()) it was moved aside. Its
#: create_timestamp is the old image's birth, useless to judge whether a replace is still on.
ASIDE_KEY = META_PREFIX + "aside_at"
#: Glance's snapshot name (glance_store's rbd driver always uses this one).
SNAP = "snap"
#: Suffix of images moved aside while being replaced.
OLD_SUFFIX = "-old"


def upload_name() -> str:
    """A new upload image name: hidden, and naming its owner for ``cleanup_leftovers``."""
    return f"{HIDDEN_PREFIX}{new_owner_id()}"


def aside_name() -> str:
    """A new name for an image moved aside during a replace."""
    return f"{HIDDEN_PREFIX}{new_owner_id()}{OLD_SUFFIX}"


def owner_of(hidden: str) -> str:
    """The owner id in an upload or aside image's name."""
    return hidden[len(HIDDEN_PREFIX):].removesuffix(OLD_SUFFIX)


def timestamp(dt: Any) -> float:
    """librbd's naive UTC datetimes → seconds since the epoch."""
    try:
        return float(calendar.timegm(dt.utctimetuple()))
    except (AttributeError, TypeError, ValueError):
        return time.time()


def has_snap(image: Any) -> bool:
    """Whether an open image has Glance's snapshot (from the header the open loaded)."""
    return any(s["name"] == SNAP for s in image.list_snaps())


def image_info(name: str, image: Any) -> ImageInfo:
    """The facts of an open image called ``name``."""
    meta = {k[len(META_PREFIX):]: v for k, v in image.metadata_list()
            if k.startswith(META_PREFIX) and k != RESTORE_KEY}
    return ImageInfo(name=name, size=image.size(),
                     mtime=meta_mtime(meta, timestamp(image.create_timestamp())),
                     mode=meta_mode(meta), version=image.id(), meta=meta)


def glance_location(fsid: str, pool: str, name: str) -> str:
    """Glance's ``rbd://fsid/pool/image/snap``, each part percent-encoded."""
    parts = [fsid, pool, name, SNAP]
    return "rbd://" + "/".join(urllib.parse.quote(p, safe="") for p in parts)
