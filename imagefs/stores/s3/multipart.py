"""The S3 requests of a multipart upload and of a small PUT, checked: used by uploads and by
server-side copies (which are multipart uploads of copied ranges above 5 GiB)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from imagefs.stores.base import BackendError, ImageInfo
from imagefs.stores.s3.layout import encode_meta, error_code, etag

if TYPE_CHECKING:
    from imagefs.stores.s3.store import S3Store
    from imagefs.stores.s3.upload import Part

log = logging.getLogger(__name__)


def create_multipart(store: S3Store, key: str, meta: Mapping[str, str]) -> str:
    r = store.call(f"{store.id}: starting upload {key}", "create_multipart_upload",
                   write=True, Key=key, Metadata=encode_meta(meta))
    return str(r["UploadId"])


def upload_part(store: S3Store, key: str, upload_id: str, part: Part) -> str:
    r = store.call(f"{store.id}: {key} part {part.number}", "upload_part", write=True,
                   Key=key, UploadId=upload_id, PartNumber=part.number, Body=part.body(),
                   ContentLength=part.length)
    tag = etag(r.get("ETag"))
    if not tag:
        raise BackendError(f"{store.id}: {key} part {part.number}: no ETag in the response")
    return tag


def complete(store: S3Store, key: str, upload_id: str, etags: Mapping[int, str], size: int) -> None:
    parts = [{"PartNumber": n, "ETag": f'"{etags[n]}"'} for n in sorted(etags)]
    if [p["PartNumber"] for p in parts] != list(range(1, len(parts) + 1)):
        raise BackendError(f"{store.id}: {key}: parts missing at completion")
    store.call(f"{store.id}: completing {key}", "complete_multipart_upload", write=True,
               Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})
    head = store.call(f"{store.id}: {key}", "head_object", Key=key)
    if int(head["ContentLength"]) != size:
        raise BackendError(f"{store.id}: {key}: completed upload holds "
                           f"{head['ContentLength']} bytes, {size} were sent")


def abort_multipart(store: S3Store, key: str, upload_id: str) -> None:
    try:
        store.s3.abort_multipart_upload(Bucket=store.bucket, Key=key, UploadId=upload_id)
    except Exception as e:
        if error_code(e)[1] != 404:  # type: ignore[arg-type]
            log.warning("%s: could not abort upload of %s: %s", store.id, key,
                        store.error(e, key))


def delete_key_quietly(store: S3Store, key: str) -> None:
    try:
        store.s3.delete_object(Bucket=store.bucket, Key=key)
    except Exception as e:
        if error_code(e)[1] != 404:  # type: ignore[arg-type]
            log.warning("%s: could not delete %s: %s", store.id, key, store.error(e, key))


def put_small(store: S3Store, name: str, part: Part, meta: Mapping[str, str]) -> ImageInfo:
    key = store.key(name)
    try:
        r = store.call(f"{store.id}/{name}", "put_object", write=True, Key=key,
                       Body=part.body(), ContentLength=part.length,
                       Metadata=encode_meta(meta))
    finally:
        part.release()
    return store.check_published(name, etag(r.get("ETag")), part.length, meta)

