"""``type = "s3"``: images are objects in one S3 bucket, optionally under a key prefix.

The package, one module per job:

* ``store``: ``S3Store``, reads and listings, rename/delete/metadata, tying the rest together;
* ``options``: the typed keys of the store's table and the checks across them;
* ``client``: the boto3 client (timeouts, retries, TLS, the secret) and error mapping;
* ``layout``: keys, hidden upload keys, part sizes, metadata encoding;
* ``upload``: writing an image (parts in flight, the memory budget, publishing);
* ``multipart``: the checked requests of multipart uploads and small PUTs;
* ``copy``: server-side copies pinned to a version (rename, metadata, publishing);
* ``leftovers``: what a crash leaves, removed at the next mount;
* ``glance``: Glance's location forms.

Copies
    Rename, metadata changes and publishing are server-side copies with ``CopySourceIfMatch``:
    one CopyObject up to ``multipart_copy_threshold`` (S3 refuses more than 5 GiB), above that a
    multipart upload of UploadPartCopy ranges. Rename then deletes the source.
"""

from imagefs.stores.s3.store import S3Store

__all__ = ["S3Store"]
