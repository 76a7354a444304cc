"""The S3 store: the one class the registry names, tying the package's pieces together.

Reads are ranged GETs with ``If-Match`` on the ETag seen at open: a replaced object answers 412
and the reader gets ``Changed`` (EIO), never bytes of two versions; the reply's ETag, status,
Content-Range and length are checked (``ranges.check_reply``) before its bytes are used.
Listings carry no metadata, so entries are HEADed in parallel and remembered while unchanged.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

from imagefs.options import StoreConfig
from imagefs.stores.base import (
    META_MODE,
    BackendError,
    Changed,
    ImageInfo,
    InvalidName,
    NotFound,
    ReadOnly,
    Store,
    Upload,
    check_name,
    is_hidden,
    meta_mode,
    meta_mtime,
)
from imagefs.stores.budget import BufferPool, MemoryBudget
from imagefs.stores.ranges import check_reply
from imagefs.stores.s3 import glance, leftovers
from imagefs.stores.s3.client import connect, map_error
from imagefs.stores.s3.copy import copy, head_raw, same_source
from imagefs.stores.s3.layout import decode_meta, encode_meta, error_code, etag
from imagefs.stores.s3.options import S3Options, check
from imagefs.stores.s3.upload import S3Upload

log = logging.getLogger(__name__)

#: How old a LastModified must be before a listing trusts what it HEADed then (clock skew).
_SETTLE = datetime.timedelta(seconds=5)


class S3Store(Store):
    type_name = "s3"
    Options = S3Options
    default_concurrency = 16

    def __init__(self, cfg: StoreConfig) -> None:
        super().__init__(cfg)
        o: S3Options = self.opts
        self.bucket = o.bucket
        self.prefix = o.prefix or ""
        self.part_size = o.part_size
        self.upload_concurrency = o.upload_concurrency
        self.upload_memory = o.upload_memory
        #: Shared by every upload of this store: parts that do not fit go to temporary files.
        self.memory = MemoryBudget(self.upload_memory, f"store {self.id}")
        #: Part buffers reused while uploads run, charged to ``memory``.
        self.buffers = BufferPool(self.memory, self.upload_concurrency + 1)
        self.copy_threshold = o.multipart_copy_threshold
        #: The longest one request may take with botocore's retries: bounds every wait.
        self.part_deadline = self.timeout * (o.max_attempts + 1)
        self._concurrency: int = cfg.concurrency or self.default_concurrency
        #: DeleteObject with If-Match: AWS has it; other services may refuse the header.
        self._conditional_delete = not o.endpoint_url
        self._client: Any = None
        self._heads: dict[str, tuple[tuple[Any, ...], ImageInfo]] = {}
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        check(options)

    # ------------------------------------------------------------------ connection
    def open(self) -> None:
        self._client = connect(self.id, self.opts, self.timeout,
                               self._concurrency + 2 * self.upload_concurrency + 4)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            self._concurrency, thread_name_prefix=f"s3-head-{self.id}")
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except Exception as e:
            raise self.error(e, f"store {self.id}: bucket {self.bucket}") from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self._client is not None:
            self._client.close()

    @property
    def s3(self) -> Any:
        if self._client is None:
            raise BackendError(f"store {self.id} is not open")
        return self._client

    def key(self, name: str) -> str:
        return self.prefix + name

    error = staticmethod(map_error)

    def call(self, what: str, method: str, write: bool = False, **kw: Any) -> Any:
        try:
            return getattr(self.s3, method)(Bucket=self.bucket, **kw)
        except Exception as e:
            raise self.error(e, what, write) from None

    # ------------------------------------------------------------------ reading
    def info(self, name: str, head: Mapping[str, Any]) -> ImageInfo:
        meta = decode_meta(head.get("Metadata") or {})
        modified = head.get("LastModified")
        return ImageInfo(name=name, size=int(head["ContentLength"]),
                         mtime=meta_mtime(meta, modified.timestamp() if modified else 0.0),
                         mode=meta_mode(meta), version=etag(head.get("ETag")), meta=meta)

    def stat(self, name: str) -> ImageInfo:
        check_name(name)
        head = self.call(f"{self.id}/{name}", "head_object", Key=self.key(name))
        return self.info(name, head)

    def names(self, prefix: str) -> Iterator[Mapping[str, Any]]:
        """Listing entries directly under ``prefix``, page by page (1,000 at a time)."""
        pages = self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix, Delimiter="/")
        try:
            for page in pages:
                yield from page.get("Contents") or ()
        except Exception as e:
            raise self.error(e, f"store {self.id}: listing {self.bucket}/{prefix}") from None

    def list(self) -> Iterator[ImageInfo]:
        """Listings carry no metadata, so each entry is HEADed, in parallel, and remembered by
        (ETag, LastModified, Size): a metadata change rewrites the object and changes the key
        (once its LastModified, in whole seconds, is old enough to tell)."""
        assert self._pool is not None
        heads = self._heads  # another listing may replace it meanwhile
        seen: dict[str, tuple[tuple[Any, ...], ImageInfo]] = {}
        batch: list[tuple[str, tuple[Any, ...]]] = []

        def flush() -> Iterator[ImageInfo]:
            known = {n: heads[n][1] for n, k in batch if n in heads and heads[n][0] == k}
            futs = {n: self._pool.submit(self._head_quietly, n)  # type: ignore[union-attr]
                    for n, _ in batch if n not in known}
            # LastModified has whole seconds: a metadata copy in the same second as the HEAD
            # keeps the key, so what was HEADed that close to it is not remembered.
            settled = datetime.datetime.now(datetime.UTC) - _SETTLE
            for n, k in batch:
                info = (futs[n].result(timeout=self.part_deadline) if n in futs
                        else known[n])
                if info is not None:
                    if n in known or (k[1] is not None and k[1] < settled):
                        seen[n] = (k, info)
                    yield info
            batch.clear()

        for entry in self.names(self.prefix):
            name = entry["Key"][len(self.prefix):]
            if is_hidden(name):
                continue
            try:
                check_name(name)
            except InvalidName:
                continue
            batch.append((name, (etag(entry.get("ETag")), entry.get("LastModified"),
                                 entry.get("Size"))))
            if len(batch) >= 1000:
                yield from flush()
        yield from flush()
        self._heads = seen

    def _head_quietly(self, name: str) -> ImageInfo | None:
        """One object's facts, or None: one unreadable object must not fail the listing."""
        try:
            return self.stat(name)
        except NotFound:
            return None  # deleted between listing and HEAD
        except (BackendError, ReadOnly, InvalidName) as e:
            log.warning("%s/%s: left out of the listing: %s", self.id, name, e)
            return None

    def read_range(self, name: str, version: str, offset: int, length: int) -> bytes:
        return b"".join(self.read_chunks(name, version, offset, length, max(length, 1)))

    def read_chunks(self, name: str, version: str, offset: int, length: int, chunk: int
                    ) -> Iterator[bytes]:
        """One ranged GET, its body handed on ``chunk`` bytes at a time as it arrives."""
        if length <= 0:
            return
        what = f"{self.id}/{name}"
        try:
            r = self.s3.get_object(Bucket=self.bucket, Key=self.key(name),
                                   Range=f"bytes={offset}-{offset + length - 1}",
                                   IfMatch=f'"{version}"')
        except Exception as e:
            code, status = error_code(e)  # type: ignore[arg-type]
            if code == "InvalidRange" or status == 416:
                return  # at or past the end
            err = self.error(e, what)
            if isinstance(err, NotFound):  # deleted under an open reader: not ENOENT on read(2)
                raise Changed(f"{what} was deleted since it was opened") from None
            raise err from None
        body = r["Body"]
        try:
            if etag(r.get("ETag")) != version:
                raise Changed(f"{what} changed since it was opened")
            got = r.get("ContentLength")
            expect = check_reply(what, r["ResponseMetadata"]["HTTPStatusCode"],
                                 r.get("ContentRange"), None if got is None else int(got),
                                 offset, length).length
            done = 0
            while done < expect:
                data = body.read(min(chunk, expect - done))
                if not data:
                    raise BackendError(f"{what}: short read: {done} of {expect} bytes")
                done += len(data)
                yield data
            if r["ResponseMetadata"]["HTTPStatusCode"] == 206 and body.read(1):
                raise BackendError(f"{what}: more bytes than Content-Range says")
        except (Changed, BackendError):
            raise
        except Exception as e:
            raise BackendError(f"{what}: reading body: {type(e).__name__}: {e}") from None
        finally:
            body.close()

    # ------------------------------------------------------------------ uploads
    def part_pool(self, size: int) -> BufferPool | None:
        """Where a new part's memory buffer comes from, or None: that part goes to a file."""
        if size * (self.upload_concurrency + 1) > self.upload_memory:
            return None
        return self.buffers

    def upload(self, name: str, size_hint: int | None = None) -> Upload:
        self._writable()
        check_name(name)
        return S3Upload(self, name, size_hint)

    def check_published(self, name: str, etag: str, size: int,
                         meta: Mapping[str, str] | None = None) -> ImageInfo:
        """HEAD what was just published, pinned to its ETag, and check its length.

        With ``meta`` (this process's own upload, whose length was checked before it became
        visible) a failing HEAD is only logged: failing the commit then would report an error
        for an image that is in fact published.
        """
        try:
            head = self.call(f"{self.id}/{name}", "head_object", Key=self.key(name),
                              **({"IfMatch": f'"{etag}"'} if etag else {}))
        except (NotFound, Changed, BackendError) as e:
            if meta is None:
                raise
            log.warning("%s/%s: published; the confirming HEAD failed: %s", self.id, name, e)
            decoded = decode_meta(encode_meta(meta))
            return ImageInfo(name=name, size=size, mtime=meta_mtime(decoded, time.time()),
                             mode=meta_mode(decoded), version=etag, meta=decoded)
        info = self.info(name, head)
        if info.size != size:
            raise BackendError(f"{self.id}/{name}: holds {info.size} bytes, expected {size}")
        return info

    def rename(self, old: str, new: str) -> ImageInfo:
        """Server-side copy, then delete the source only if it is still what was copied: a
        source replaced meanwhile is kept (and the rename reported as failed), never lost."""
        self._writable()
        check_name(new)
        src_key = self.key(old)
        pinned = head_raw(self, src_key)
        src = self.info(old, pinned)
        info = copy(self, src_key, self.key(new), src.meta, pinned, src.size)
        if not same_source(self, src_key, pinned):
            raise Changed(f"{self.id}/{old} was replaced during the rename; {new} holds the "
                          "version that was renamed and the new one stays under the old name")
        self.call(f"{self.id}/{old}", "delete_object", write=True, Key=src_key,
                   **({"IfMatch": f'"{src.version}"'} if self._conditional_delete else {}))
        return ImageInfo(name=new, size=info.size, mtime=info.mtime, mode=info.mode,
                         version=info.version, meta=info.meta)

    def delete(self, name: str) -> None:
        self._writable()
        self.stat(name)  # S3 deletes of missing keys succeed; ENOENT must still be ENOENT
        self.call(f"{self.id}/{name}", "delete_object", write=True, Key=self.key(name))

    def set_meta(self, name: str, meta: Mapping[str, str], expect: str | None = None
                 ) -> ImageInfo:
        """S3 metadata is fixed at creation: replace it by copying the object onto itself (the
        copy is conditional on the ETag seen, so ``expect`` holds through it)."""
        self._writable()
        pinned = head_raw(self, self.key(name))
        cur = self.info(name, pinned)
        if expect is not None and cur.version != expect:
            raise Changed(f"{self.id}/{name} is no longer version {expect}")
        merged = {**cur.meta, **meta}
        if META_MODE in merged:
            merged[META_MODE] = f"{int(merged[META_MODE], 8) & 0o7777:o}"
        return copy(self, self.key(name), self.key(name), merged, pinned, cur.size)

    # ------------------------------------------------------------------ leftovers, locations
    def cleanup_leftovers(self) -> int:
        return leftovers.cleanup_leftovers(self)

    def location(self, name: str) -> str:
        return glance.location(self, name)

    def glance_location(self, name: str) -> str:
        return glance.glance_location(self, name)

    def properties(self) -> dict[str, str]:
        props = {"bucket": self.bucket, "prefix": self.prefix}
        if self.opts.endpoint_url:
            parts = urlsplit(self.opts.endpoint_url)
            props["endpoint_url"] = parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]).geturl()
        if self.opts.region:
            props["region"] = self.opts.region
        return props

    def usage(self) -> tuple[int, int] | None:
        count = total = 0
        for entry in self.names(self.prefix):
            if not is_hidden(entry["Key"][len(self.prefix):]):
                count += 1
                total += int(entry.get("Size") or 0)
        return count, total

