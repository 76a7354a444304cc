"""What a crash leaves in a bucket, and removing it at the next mount.

Multipart uploads and completed hidden objects under the prefix whose owner is gone (this
host, process dead) are removed at once; those of other hosts once older than
``leftover_age`` (``owners.condemned``), as are multipart copies onto image keys (a crash during
the rename or metadata change of a large image), which name no owner, older than that.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from imagefs.stores.owners import condemned
from imagefs.stores.s3.layout import UPLOAD_TAG
from imagefs.stores.s3.multipart import abort_multipart, delete_key_quietly

if TYPE_CHECKING:
    from imagefs.stores.s3.store import S3Store


def cleanup_leftovers(store: S3Store) -> int:
    """Abort uploads and delete hidden objects whose owner is gone (see module doc)."""
    if store.read_only:
        return 0
    removed = 0
    now = time.time()
    tag = store.prefix + UPLOAD_TAG

    def age(when: Any) -> float:
        return now - when.timestamp() if when is not None else 0.0

    def orphan(key: str, when: Any) -> bool:
        return condemned(key[len(tag):], age(when), store.opts.leftover_age)

    def stale_copy(key: str, when: Any) -> bool:
        """A multipart copy onto an image's own key (rename, metadata change of a large
        image) whose process died: nothing names its owner, so only age condemns it."""
        name = key[len(store.prefix):]
        if "/" in name or when is None:
            return False
        return age(when) > store.opts.leftover_age

    pages = store.s3.get_paginator("list_multipart_uploads").paginate(
        Bucket=store.bucket, Prefix=store.prefix)
    try:
        for page in pages:
            for up in page.get("Uploads") or ():
                key, when = up["Key"], up.get("Initiated")
                if (orphan(key, when) if key.startswith(tag)
                        else stale_copy(key, when)):
                    abort_multipart(store, key, up["UploadId"])
                    removed += 1
    except Exception as e:
        raise store.error(e, f"store {store.id}: listing uploads") from None
    for entry in store.names(tag):
        if orphan(entry["Key"], entry.get("LastModified")):
            delete_key_quietly(store, entry["Key"])
            removed += 1
    return removed

