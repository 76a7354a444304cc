"""Server-side copies: how rename, metadata changes and publishing replace an object whole.

One CopyObject up to ``multipart_copy_threshold`` (S3 refuses more than 5 GiB), above that a
multipart upload of UploadPartCopy ranges, each pinned to the version that was HEADed.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from imagefs.stores.base import Changed, ImageInfo, NotFound
from imagefs.stores.s3.layout import encode_meta, etag
from imagefs.stores.s3.multipart import abort_multipart, create_multipart

if TYPE_CHECKING:
    from imagefs.stores.s3.store import S3Store


def head_raw(store: S3Store, key: str) -> Mapping[str, Any]:
    return store.call(f"{store.id}: {key}", "head_object", Key=key)


def same_source(store: S3Store, key: str, pinned: Mapping[str, Any]) -> bool:
    """True if ``key`` still holds the object of HEAD ``pinned`` (ETag and LastModified:
    a same-size replacement with the same ETag is impossible, a metadata copy changes the
    time)."""
    try:
        now = head_raw(store, key)
    except NotFound:
        return False
    return (etag(now.get("ETag")), now.get("LastModified")) == \
        (etag(pinned.get("ETag")), pinned.get("LastModified"))


def copy(store: S3Store, src_key: str, dst_key: str, meta: Mapping[str, str],
          pinned: Mapping[str, Any] | None, size: int, publishing: bool = False
          ) -> ImageInfo:
    """Copy ``src_key`` to ``dst_key`` with ``meta`` replacing its metadata, atomically.

    ``pinned`` is the source's HEAD: the copy must be of that version. CopyObject sends
    If-Match for it (RGW honours its own header name, mirrored by ``_rgw_copy_if_match``);
    UploadPartCopy conditions are ignored by RGW, so a multipart copy re-checks the source
    after the last part and aborts instead of completing a mix of two versions.
    """
    name = dst_key[len(store.prefix):]
    what = f"{store.id}: copy {src_key} -> {dst_key}"
    source = {"Bucket": store.bucket, "Key": src_key}
    tag = etag(pinned.get("ETag")) if pinned else ""
    cond = {"CopySourceIfMatch": f'"{tag}"'} if tag else {}
    own = meta if publishing else None
    if size <= store.copy_threshold:
        r = store.call(what, "copy_object", write=True, Key=dst_key, CopySource=source,
                       MetadataDirective="REPLACE", Metadata=encode_meta(meta), **cond)
        new = etag((r.get("CopyObjectResult") or {}).get("ETag"))
        return store.check_published(name, new, size, own)
    upload_id = create_multipart(store, dst_key, meta)
    try:
        step = max(store.copy_threshold, -(-size // 9000))
        ranges = [(i + 1, off, min(size, off + step) - 1)
                  for i, off in enumerate(range(0, size, step))]

        def copy_part(n: int, first: int, last: int) -> dict[str, Any]:
            r = store.call(f"{what} part {n}", "upload_part_copy", write=True, Key=dst_key,
                           UploadId=upload_id, PartNumber=n, CopySource=source,
                           CopySourceRange=f"bytes={first}-{last}", **cond)
            return {"PartNumber": n, "ETag": (r.get("CopyPartResult") or {})["ETag"]}

        with concurrent.futures.ThreadPoolExecutor(store.upload_concurrency) as pool:
            parts = list(pool.map(lambda a: copy_part(*a), ranges))
        if pinned is not None and not same_source(store, src_key, pinned):
            raise Changed(f"{store.id}/{src_key[len(store.prefix):]} changed while it was "
                          "being copied")
        r = store.call(what, "complete_multipart_upload", write=True, Key=dst_key,
                       UploadId=upload_id, MultipartUpload={"Parts": parts})
    except BaseException:
        abort_multipart(store, dst_key, upload_id)
        raise
    return store.check_published(name, etag(r.get("ETag")), size, own)

