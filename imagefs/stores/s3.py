"""``type = "s3"``: images are objects in one S3 bucket, optionally under a key prefix.

Reads
    Ranged GETs with ``If-Match`` on the ETag seen at open: a replaced object answers 412 and the
    reader gets ``Changed`` (EIO), never bytes of two versions. The response's ETag,
    Content-Range and length are checked before its bytes are used.

Uploads
    Writes arrive in order (no ``random_write``: ``writer.py`` spools non-sequential writers and
    uploads the spool at close). An image smaller than one part is a single PUT at commit, with
    its metadata. A larger one becomes a multipart upload to a hidden key
    ``<prefix>.imagefs-up-<owner-id>``; parts go up from a small thread pool while the writer
    goes on. Commit completes the upload, then a server-side copy to the final key (with mtime,
    mode and hashes as metadata, which S3 only accepts when an object is created) publishes the
    whole image in one step, and the hidden object is deleted. The final key therefore never
    holds a partial object, and a crash leaves only hidden keys that carry their owner's id.

    Part sizes start at ``part_size`` (or what a known size needs to fit 9,000 parts) and double
    every 1,000 parts, so any image up to S3's 5 TiB fits in 10,000 parts. Part buffers of all
    uploads of the store together stay within ``upload_memory`` (``budget.py``): a part that
    does not fit in what is left, or that would not fit ``upload_concurrency + 1`` times in the
    whole budget, is buffered in an unlinked temporary file instead of RAM.

Copies
    Rename, metadata changes and publishing are server-side copies with ``CopySourceIfMatch``:
    one CopyObject up to ``multipart_copy_threshold`` (S3 refuses more than 5 GiB), above that a
    multipart upload of UploadPartCopy ranges. Rename then deletes the source.

Leftovers
    At mount, multipart uploads and completed hidden objects under the prefix whose owner is
    gone (this host, process dead) are removed; those of other hosts once older than
    ``leftover_age``, as are multipart copies onto image keys (a crash during the rename or
    metadata change of a large image) older than that.

Errors
    botocore's own retry configuration ("standard" mode) retries what is safe; each attempt is
    bounded by ``timeout``, so a dead endpoint ends in ``BackendError`` (EIO), never a hang.
    The secret is read from ``secret_access_key_file`` and never logged.

Locations
    ``location`` is Glance's s3:// form without credentials; ``glance_location`` adds them
    (``s3://ACCESS:SECRET@host/bucket/key``, all glance_store's S3 driver reads from) and is
    served to root only. Keys glance_store cannot name (with '/' or '@') have neither.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import logging
import re
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from typing import IO, Any
from urllib.parse import urlsplit

from imagefs.options import Option, StoreConfig
from imagefs.stores.base import (
    HIDDEN_PREFIX,
    META_MODE,
    BackendError,
    Changed,
    ImageInfo,
    InvalidName,
    NoSpace,
    NotFound,
    OptionError,
    ReadOnly,
    Store,
    Unsupported,
    Upload,
    check_name,
    glance_literal,
    is_hidden,
    meta_mode,
    meta_mtime,
    user_meta,
)
from imagefs.stores.budget import MemoryBudget
from imagefs.stores.owners import new_owner_id, owner_state

log = logging.getLogger(__name__)

MiB = 1 << 20
GiB = 1 << 30
MIN_PART = 5 * MiB  # S3's floor for every part but the last
MAX_PART = 5 * GiB
MAX_PARTS = 10_000
PARTS_PER_TIER = 1_000  # part size doubles after each tier of this many parts
UPLOAD_TAG = HIDDEN_PREFIX + "up-"

_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
#: How old a LastModified must be before a listing trusts what it HEADed then (clock skew).
_SETTLE = datetime.timedelta(seconds=5)
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def _code(e: Exception) -> tuple[str, int]:
    """(error code, HTTP status) of a botocore ClientError, ("", 0) for anything else."""
    resp = getattr(e, "response", None) or {}
    return (str(resp.get("Error", {}).get("Code", "")),
            int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0))


def _etag(value: str | None) -> str:
    return (value or "").strip().strip('"')


def _encode_meta(meta: Mapping[str, str]) -> dict[str, str]:
    """``os_hash_value`` → ``os-hash-value``: proxies in front of S3 may drop '_' headers."""
    return {k.replace("_", "-"): str(v) for k, v in user_meta(meta).items()}


def _decode_meta(meta: Mapping[str, str]) -> dict[str, str]:
    return {k.lower().replace("-", "_"): v for k, v in meta.items()}


def _rgw_copy_if_match(request: Any, **_: Any) -> None:
    """Ceph RGW ignores ``x-amz-copy-source-if-match`` on CopyObject but honours its own
    ``x-amz-copy-if-match``: send both, so the copy is pinned to the version on either."""
    value = request.headers.get("x-amz-copy-source-if-match")
    if value is not None and "x-amz-copy-if-match" not in request.headers:
        request.headers["x-amz-copy-if-match"] = value


def _part_size_for(base: int, number: int) -> int:
    """Size of part ``number`` (1-based): doubling every tier keeps 10,000 parts enough."""
    return min(MAX_PART, base << ((number - 1) // PARTS_PER_TIER))


class _Part:
    """One part's bytes: in memory when small enough, else in an unlinked temporary file."""

    def __init__(self, number: int, size: int, budget: MemoryBudget | None) -> None:
        """``budget``: where the part's memory was taken from (None: the part goes to a file)."""
        self.number = number
        self.size = size
        self.length = 0
        self._budget = budget
        self._mem: bytearray | None = bytearray() if budget is not None else None
        self._file: IO[bytes] | None = None if budget is not None else tempfile.TemporaryFile()

    def add(self, data: memoryview) -> int:
        """Append what fits; returns how many bytes were taken."""
        take = data[: self.size - self.length]
        if self._mem is not None:
            self._mem += take
        else:
            assert self._file is not None
            self._file.write(take)
        self.length += len(take)
        return len(take)

    @property
    def full(self) -> bool:
        return self.length >= self.size

    def body(self) -> bytearray | IO[bytes]:
        if self._mem is not None:
            return self._mem  # botocore takes a bytearray as it is: no second copy of the part
        assert self._file is not None
        self._file.seek(0)
        return self._file

    def release(self) -> None:
        if self._budget is not None:
            self._budget.give(self.size)
            self._budget = None
        self._mem = None
        if self._file is not None:
            self._file.close()
            self._file = None


class S3Upload(Upload):
    """A new image streaming into a hidden multipart upload (or one PUT if it stays small).

    ``write`` and ``commit`` hold ``_mutex`` while they run. ``abort`` may come from another
    thread while an abandoned ``write`` still runs (the bridge gives up on slow calls): it marks
    the upload dead first, which every wait in ``write`` checks, then takes the mutex, so no
    part or multipart upload is created after an abort.
    """

    def __init__(self, store: S3Store, name: str, size_hint: int | None) -> None:
        self.store = store
        self.name = name
        self.key = store._key(name)
        self.hidden = f"{store.prefix}{UPLOAD_TAG}{new_owner_id()}"
        self.pos = 0
        self.base_part = store._base_part_size(size_hint)
        self.part: _Part | None = None
        self.upload_id: str | None = None
        self.etags: dict[int, str] = {}
        self.parts_made = 0
        self.pending: list[concurrent.futures.Future[None]] = []
        self.failed: BaseException | None = None
        self.finished = False
        self.dead = False
        self._slots = threading.Semaphore(store.upload_concurrency)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._mutex = threading.Lock()

    def _what(self) -> str:
        return f"{self.store.id}/{self.name}"

    def _alive(self) -> None:
        if self.dead or self.finished:
            raise BackendError(f"{self._what()}: upload already finished")
        if self.failed is not None:
            raise BackendError(f"{self._what()}: part upload failed: {self.failed}")

    def _new_part(self) -> _Part:
        self.parts_made += 1
        number = self.parts_made
        if number > MAX_PARTS:
            raise NoSpace(f"{self._what()}: image exceeds {MAX_PARTS} parts")
        size = _part_size_for(self.base_part, number)
        return _Part(number, size, self.store._part_budget(size))

    def write(self, offset: int, data: bytes) -> None:
        with self._mutex:
            self._alive()
            if offset != self.pos:
                raise BackendError(f"{self._what()}: S3 uploads take writes in order "
                                   f"(got offset {offset}, expected {self.pos})")
            view = memoryview(data)
            while view:
                self._alive()
                if self.part is None:
                    self.part = self._new_part()
                view = view[self.part.add(view):]
                if self.part.full:
                    part, self.part = self.part, None
                    self._send(part)
            self.pos += len(data)

    def _send(self, part: _Part) -> None:
        """Hand a full part to the pool; blocks while ``upload_concurrency`` parts are in flight.

        The wait is shorter than the caller's deadline, so a stalled backend surfaces here as
        an error instead of an abandoned thread.
        """
        try:
            if self.upload_id is None:
                self.upload_id = self.store._create_multipart(self.hidden, {})
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    self.store.upload_concurrency, thread_name_prefix=f"s3-{self.store.id}")
            deadline = time.monotonic() + self.store.timeout * 0.9
            while not self._slots.acquire(timeout=0.25):
                self._alive()
                if time.monotonic() > deadline:
                    raise BackendError(f"{self._what()}: part uploads stalled")
        except BaseException:
            part.release()
            raise
        self.pending.append(self._pool.submit(self._upload_part, part))

    def _upload_part(self, part: _Part) -> None:
        try:
            if self.dead:
                return
            etag = self.store._upload_part(self.hidden, self.upload_id or "", part)
            with self._lock:
                self.etags[part.number] = etag
        except BaseException as e:
            self.failed = self.failed or e
            raise
        finally:
            part.release()
            self._slots.release()

    def _wait_parts(self) -> None:
        """Wait for the parts in flight, no longer than each could take with its retries."""
        _, late = concurrent.futures.wait(self.pending, timeout=self.store.part_deadline)
        if late:
            raise BackendError(f"{self._what()}: {len(late)} part upload(s) did not finish")
        self.pending = []
        self._alive()

    def flush(self) -> None:
        """Parts sent so far are stored; the tail stays buffered (S3 needs 5 MiB per part)."""
        with self._mutex:
            self._wait_parts()

    def commit(self, meta: Mapping[str, str]) -> ImageInfo:
        with self._mutex:
            self._alive()
            store = self.store
            try:
                if self.upload_id is None:
                    part = self.part or _Part(1, 0, None)
                    self.part = None
                    info = store._put_small(self.name, part, meta)
                else:
                    if self.part is not None and self.part.length:
                        part, self.part = self.part, None
                        self._send(part)
                    self._wait_parts()
                    store._complete(self.hidden, self.upload_id, self.etags, self.pos)
                    self.upload_id = None
                    info = store._copy(self.hidden, self.key, meta, None, self.pos,
                                       publishing=True)
                    store._delete_key_quietly(self.hidden)
            except BaseException:
                self._abort_in_background()
                raise
            self._close_pool()
            self.finished = True
            return info

    def _abort_in_background(self) -> None:
        """A failed commit reports at once; the clean-up runs in a thread of its own. Done
        inline it waited again for the parts that had just timed out, then for the abort and
        the delete, each with its retries: a stalled backend held the writer's close() in D
        state for about ten store timeouts. What it cannot remove, the next mount does."""
        self.dead = self.finished = True

        def clean_up() -> None:
            with self._mutex:
                try:
                    self._abort_locked()
                except Exception as e:
                    log.warning("%s: abort after a failed commit: %s (removed at the next "
                                "mount)", self._what(), e)

        threading.Thread(target=clean_up, name=f"s3-abort-{self.store.id}",
                         daemon=True).start()

    def _close_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def abort(self) -> None:
        if self.finished:  # committed, or a failed commit's clean-up is already under way
            return
        self.dead = True
        if not self._mutex.acquire(timeout=self.store.part_deadline):
            log.warning("%s: abort gave up waiting for a stuck writer; the upload is left "
                        "for the next mount's cleanup", self._what())
            return
        try:
            self._abort_locked()
        finally:
            self._mutex.release()

    def _abort_locked(self) -> None:
        self.dead = True
        self.finished = True
        if self.part is not None:
            self.part.release()
            self.part = None
        if self.part is not None:
            self.part.release()
            self.part = None
        concurrent.futures.wait(self.pending, timeout=self.store.part_deadline)
        self.pending = []
        self._close_pool()
        if self.upload_id is not None:
            self.store._abort_multipart(self.hidden, self.upload_id)
            self.upload_id = None
        self.store._delete_key_quietly(self.hidden)


class S3Store(Store):
    type_name = "s3"
    OPTIONS = {
        "endpoint_url": Option("str", help="S3 endpoint; omitted: AWS"),
        "bucket": Option("str", required=True),
        "prefix": Option("str", default=""),
        "region": Option("str"),
        "profile": Option("str", help="a profile of the AWS shared config/credentials"),
        "access_key_id": Option("str"),
        "secret_access_key_file": Option("secret_file",
                                         help="file holding the secret access key"),
        "addressing_style": Option(("path", "virtual", "auto"), default="auto"),
        "ca_bundle": Option("path"),
        "verify_tls": Option("bool", default=True),
        "part_size": Option("size", default=8 * MiB),
        "upload_concurrency": Option("int", default=4),
        "upload_memory": Option("size", default=64 * MiB),
        "multipart_copy_threshold": Option("size", default=MAX_PART),
        "max_attempts": Option("int", default=4),
        "leftover_age": Option("float", default=86400.0),
    }
    default_concurrency = 16

    def __init__(self, cfg: StoreConfig) -> None:
        super().__init__(cfg)
        o = self.options
        self.bucket: str = o["bucket"]
        self.prefix: str = o.get("prefix") or ""
        self.part_size: int = o["part_size"]
        self.upload_concurrency: int = o["upload_concurrency"]
        self.upload_memory: int = o["upload_memory"]
        #: Shared by every upload of this store: parts that do not fit go to temporary files.
        self.memory = MemoryBudget(self.upload_memory, f"store {self.id}")
        self.copy_threshold: int = o["multipart_copy_threshold"]
        #: The longest one request may take with botocore's retries: bounds every wait.
        self.part_deadline: float = self.timeout * (o["max_attempts"] + 1)
        self._concurrency: int = cfg.concurrency or self.default_concurrency
        #: DeleteObject with If-Match: AWS has it; other services may refuse the header.
        self._conditional_delete = not o.get("endpoint_url")
        self._client: Any = None
        self._heads: dict[str, tuple[tuple[Any, ...], ImageInfo]] = {}
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        if not _BUCKET.match(options["bucket"]):
            raise OptionError("bucket", "a bucket name: 3-63 of a-z 0-9 . -")
        prefix = options.get("prefix") or ""
        if prefix.startswith("/") or "//" in prefix:
            raise OptionError("prefix", 'a key prefix without a leading "/" or "//"')
        if prefix and not prefix.endswith("/") and "/" in prefix:
            raise OptionError("prefix", 'a prefix ending in "/" when it contains "/"')
        if bool(options.get("access_key_id")) != bool(options.get("secret_access_key_file")):
            raise OptionError("secret_access_key_file" if options.get("access_key_id")
                              else "access_key_id",
                              "access_key_id and secret_access_key_file given together")
        if options.get("profile") and options.get("access_key_id"):
            raise OptionError("profile", "either profile or access_key_id, not both")
        if not MIN_PART <= options["part_size"] <= MAX_PART:
            raise OptionError("part_size", "a size from 5MiB to 5GiB")
        if not 1 <= options["upload_concurrency"] <= 64:
            raise OptionError("upload_concurrency", "an integer from 1 to 64")
        if not MIN_PART <= options["multipart_copy_threshold"] <= MAX_PART:
            raise OptionError("multipart_copy_threshold", "a size from 5MiB to 5GiB")
        if options["max_attempts"] < 1:
            raise OptionError("max_attempts", "an integer of at least 1")
        url = options.get("endpoint_url")
        if url and urlsplit(url).scheme not in ("http", "https"):
            raise OptionError("endpoint_url", "an http:// or https:// URL")

    # ------------------------------------------------------------------ connection
    def open(self) -> None:
        import boto3
        from botocore.config import Config

        o = self.options
        secret = None
        if o.get("secret_access_key_file"):
            try:
                with open(o["secret_access_key_file"]) as f:
                    secret = f.read().strip()
            except OSError as e:
                raise BackendError(f"store {self.id}: cannot read secret_access_key_file "
                                   f"{o['secret_access_key_file']}: {e.strerror}") from None
        session = boto3.session.Session(profile_name=o.get("profile"),
                                        aws_access_key_id=o.get("access_key_id"),
                                        aws_secret_access_key=secret)
        config = Config(
            region_name=o.get("region"),
            signature_version="s3v4",
            # Every PUT carries the SHA-256 of its body in its signature, which the server
            # checks (botocore does it anyway over plain http): the integrity check of each
            # part, at 1.6 GB/s, where a Content-MD5 cost a second pass at half that speed.
            s3={"addressing_style": o["addressing_style"], "payload_signing_enabled": True},
            retries={"mode": "standard", "max_attempts": o["max_attempts"]},
            connect_timeout=min(self.timeout, 10.0),
            read_timeout=self.timeout,
            max_pool_connections=self._concurrency + 2 * self.upload_concurrency + 4,
            tcp_keepalive=True,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        verify: bool | str = o.get("ca_bundle") or o["verify_tls"]
        self._client = session.client("s3", endpoint_url=o.get("endpoint_url"), config=config,
                                      verify=verify)
        if o.get("endpoint_url"):
            self._client.meta.events.register("before-sign.s3.CopyObject", _rgw_copy_if_match)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            self._concurrency, thread_name_prefix=f"s3-head-{self.id}")
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except Exception as e:
            raise self._error(e, f"store {self.id}: bucket {self.bucket}") from None

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

    def _key(self, name: str) -> str:
        return self.prefix + name

    def _error(self, e: BaseException, what: str, write: bool = False) -> Exception:
        """Map a botocore/urllib3 failure to the store errors the FUSE layer understands."""
        code, status = _code(e)  # type: ignore[arg-type]
        if code in ("NoSuchBucket", "NoSuchUpload"):
            return BackendError(f"{what}: {code}")
        if code in ("NoSuchKey", "NotFound", "404") or status == 404:
            return NotFound(what)
        if code in ("PreconditionFailed",) or status == 412:
            return Changed(f"{what} changed since it was opened")
        if code in ("QuotaExceeded", "EntityTooLarge", "InsufficientCapacity"):
            return NoSpace(f"{what}: {code}")
        if code in ("AccessDenied", "AllAccessDisabled") and write:
            return ReadOnly(f"{what}: {code}")
        if code in ("KeyTooLongError",):
            return InvalidName(f"{what}: {code}")
        if status:
            return BackendError(f"{what}: HTTP {status} {code}")
        return BackendError(f"{what}: {type(e).__name__}: {e}", retryable=True)

    def _call(self, what: str, method: str, write: bool = False, **kw: Any) -> Any:
        try:
            return getattr(self.s3, method)(Bucket=self.bucket, **kw)
        except Exception as e:
            raise self._error(e, what, write) from None

    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnly(f"store {self.id} is read-only")

    # ------------------------------------------------------------------ reading
    def _info(self, name: str, head: Mapping[str, Any]) -> ImageInfo:
        meta = _decode_meta(head.get("Metadata") or {})
        modified = head.get("LastModified")
        return ImageInfo(name=name, size=int(head["ContentLength"]),
                         mtime=meta_mtime(meta, modified.timestamp() if modified else 0.0),
                         mode=meta_mode(meta), version=_etag(head.get("ETag")), meta=meta)

    def stat(self, name: str) -> ImageInfo:
        check_name(name)
        head = self._call(f"{self.id}/{name}", "head_object", Key=self._key(name))
        return self._info(name, head)

    def _names(self, prefix: str) -> Iterator[Mapping[str, Any]]:
        """Listing entries directly under ``prefix``, page by page (1,000 at a time)."""
        pages = self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix, Delimiter="/")
        try:
            for page in pages:
                yield from page.get("Contents") or ()
        except Exception as e:
            raise self._error(e, f"store {self.id}: listing {self.bucket}/{prefix}") from None

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

        for entry in self._names(self.prefix):
            name = entry["Key"][len(self.prefix):]
            if is_hidden(name):
                continue
            try:
                check_name(name)
            except InvalidName:
                continue
            batch.append((name, (_etag(entry.get("ETag")), entry.get("LastModified"),
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
            r = self.s3.get_object(Bucket=self.bucket, Key=self._key(name),
                                   Range=f"bytes={offset}-{offset + length - 1}",
                                   IfMatch=f'"{version}"')
        except Exception as e:
            code, status = _code(e)  # type: ignore[arg-type]
            if code == "InvalidRange" or status == 416:
                return  # at or past the end
            err = self._error(e, what)
            if isinstance(err, NotFound):  # deleted under an open reader: not ENOENT on read(2)
                raise Changed(f"{what} was deleted since it was opened") from None
            raise err from None
        body = r["Body"]
        try:
            expect = self._expected_body(r, what, version, offset, length)
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
            raise BackendError(f"{what}: reading body: {type(e).__name__}: {e}",
                               retryable=True) from None
        finally:
            body.close()

    @staticmethod
    def _expected_body(r: Mapping[str, Any], what: str, version: str, offset: int,
                       length: int) -> int:
        """How many body bytes a ranged GET's reply must carry, after checking its ETag,
        status and Content-Range."""
        if _etag(r.get("ETag")) != version:
            raise Changed(f"{what} changed since it was opened")
        status = r["ResponseMetadata"]["HTTPStatusCode"]
        got = int(r.get("ContentLength", -1))
        if status == 206:
            m = _RANGE.match(r.get("ContentRange") or "")
            if not m or int(m.group(1)) != offset:
                raise BackendError(f"{what}: bad Content-Range {r.get('ContentRange')!r}")
            total = int(m.group(3)) if m.group(3) != "*" else offset + got
            expect = min(length, total - offset)
            if int(m.group(2)) - offset + 1 != expect or got != expect:
                raise BackendError(f"{what}: bad Content-Range {r.get('ContentRange')!r} "
                                   f"for {got} bytes")
            return expect
        if status == 200 and offset == 0:
            return min(length, got)  # a server that ignores Range sends it all
        raise BackendError(f"{what}: unexpected HTTP {status} to a ranged GET")

    # ------------------------------------------------------------------ uploads
    def _base_part_size(self, size_hint: int | None) -> int:
        """A known size gets parts large enough to fit in 9,000 (slack for growth)."""
        if not size_hint:
            return self.part_size
        need = -(-size_hint // 9000)
        return min(MAX_PART, max(self.part_size, -(-need // MiB) * MiB))

    def _part_budget(self, size: int) -> MemoryBudget | None:
        """The budget a new part's memory came from, or None: that part goes to a file."""
        if size * (self.upload_concurrency + 1) > self.upload_memory:
            return None
        return self.memory if self.memory.try_take(size) else None

    def upload(self, name: str, size_hint: int | None = None) -> Upload:
        self._writable()
        check_name(name)
        return S3Upload(self, name, size_hint)

    def _create_multipart(self, key: str, meta: Mapping[str, str]) -> str:
        r = self._call(f"{self.id}: starting upload {key}", "create_multipart_upload",
                       write=True, Key=key, Metadata=_encode_meta(meta))
        return str(r["UploadId"])

    def _upload_part(self, key: str, upload_id: str, part: _Part) -> str:
        r = self._call(f"{self.id}: {key} part {part.number}", "upload_part", write=True,
                       Key=key, UploadId=upload_id, PartNumber=part.number, Body=part.body(),
                       ContentLength=part.length)
        etag = _etag(r.get("ETag"))
        if not etag:
            raise BackendError(f"{self.id}: {key} part {part.number}: no ETag in the response")
        return etag

    def _complete(self, key: str, upload_id: str, etags: Mapping[int, str], size: int) -> None:
        parts = [{"PartNumber": n, "ETag": f'"{etags[n]}"'} for n in sorted(etags)]
        if [p["PartNumber"] for p in parts] != list(range(1, len(parts) + 1)):
            raise BackendError(f"{self.id}: {key}: parts missing at completion")
        self._call(f"{self.id}: completing {key}", "complete_multipart_upload", write=True,
                   Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})
        head = self._call(f"{self.id}: {key}", "head_object", Key=key)
        if int(head["ContentLength"]) != size:
            raise BackendError(f"{self.id}: {key}: completed upload holds "
                               f"{head['ContentLength']} bytes, {size} were sent")

    def _abort_multipart(self, key: str, upload_id: str) -> None:
        try:
            self.s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except Exception as e:
            if _code(e)[1] != 404:  # type: ignore[arg-type]
                log.warning("%s: could not abort upload of %s: %s", self.id, key,
                            self._error(e, key))

    def _delete_key_quietly(self, key: str) -> None:
        try:
            self.s3.delete_object(Bucket=self.bucket, Key=key)
        except Exception as e:
            if _code(e)[1] != 404:  # type: ignore[arg-type]
                log.warning("%s: could not delete %s: %s", self.id, key, self._error(e, key))

    def _put_small(self, name: str, part: _Part, meta: Mapping[str, str]) -> ImageInfo:
        key = self._key(name)
        try:
            r = self._call(f"{self.id}/{name}", "put_object", write=True, Key=key,
                           Body=part.body(), ContentLength=part.length,
                           Metadata=_encode_meta(meta))
        finally:
            part.release()
        return self._check_published(name, _etag(r.get("ETag")), part.length, meta)

    def _check_published(self, name: str, etag: str, size: int,
                         meta: Mapping[str, str] | None = None) -> ImageInfo:
        """HEAD what was just published, pinned to its ETag, and check its length.

        With ``meta`` (this process's own upload, whose length was checked before it became
        visible) a failing HEAD is only logged: failing the commit then would report an error
        for an image that is in fact published.
        """
        try:
            head = self._call(f"{self.id}/{name}", "head_object", Key=self._key(name),
                              **({"IfMatch": f'"{etag}"'} if etag else {}))
        except (NotFound, Changed, BackendError) as e:
            if meta is None:
                raise
            log.warning("%s/%s: published; the confirming HEAD failed: %s", self.id, name, e)
            decoded = _decode_meta(_encode_meta(meta))
            return ImageInfo(name=name, size=size, mtime=meta_mtime(decoded, time.time()),
                             mode=meta_mode(decoded), version=etag, meta=decoded)
        info = self._info(name, head)
        if info.size != size:
            raise BackendError(f"{self.id}/{name}: holds {info.size} bytes, expected {size}")
        return info

    # ------------------------------------------------------------------ server-side copies
    def _head_raw(self, key: str) -> Mapping[str, Any]:
        return self._call(f"{self.id}: {key}", "head_object", Key=key)

    def _same_source(self, key: str, pinned: Mapping[str, Any]) -> bool:
        """True if ``key`` still holds the object of HEAD ``pinned`` (ETag and LastModified:
        a same-size replacement with the same ETag is impossible, a metadata copy changes the
        time)."""
        try:
            now = self._head_raw(key)
        except NotFound:
            return False
        return (_etag(now.get("ETag")), now.get("LastModified")) == \
            (_etag(pinned.get("ETag")), pinned.get("LastModified"))

    def _copy(self, src_key: str, dst_key: str, meta: Mapping[str, str],
              pinned: Mapping[str, Any] | None, size: int, publishing: bool = False
              ) -> ImageInfo:
        """Copy ``src_key`` to ``dst_key`` with ``meta`` replacing its metadata, atomically.

        ``pinned`` is the source's HEAD: the copy must be of that version. CopyObject sends
        If-Match for it (RGW honours its own header name, mirrored by ``_rgw_copy_if_match``);
        UploadPartCopy conditions are ignored by RGW, so a multipart copy re-checks the source
        after the last part and aborts instead of completing a mix of two versions.
        """
        name = dst_key[len(self.prefix):]
        what = f"{self.id}: copy {src_key} -> {dst_key}"
        source = {"Bucket": self.bucket, "Key": src_key}
        etag = _etag(pinned.get("ETag")) if pinned else ""
        cond = {"CopySourceIfMatch": f'"{etag}"'} if etag else {}
        own = meta if publishing else None
        if size <= self.copy_threshold:
            r = self._call(what, "copy_object", write=True, Key=dst_key, CopySource=source,
                           MetadataDirective="REPLACE", Metadata=_encode_meta(meta), **cond)
            new = _etag((r.get("CopyObjectResult") or {}).get("ETag"))
            return self._check_published(name, new, size, own)
        upload_id = self._create_multipart(dst_key, meta)
        try:
            step = max(self.copy_threshold, -(-size // 9000))
            ranges = [(i + 1, off, min(size, off + step) - 1)
                      for i, off in enumerate(range(0, size, step))]

            def copy_part(n: int, first: int, last: int) -> dict[str, Any]:
                r = self._call(f"{what} part {n}", "upload_part_copy", write=True, Key=dst_key,
                               UploadId=upload_id, PartNumber=n, CopySource=source,
                               CopySourceRange=f"bytes={first}-{last}", **cond)
                return {"PartNumber": n, "ETag": (r.get("CopyPartResult") or {})["ETag"]}

            with concurrent.futures.ThreadPoolExecutor(self.upload_concurrency) as pool:
                parts = list(pool.map(lambda a: copy_part(*a), ranges))
            if pinned is not None and not self._same_source(src_key, pinned):
                raise Changed(f"{self.id}/{src_key[len(self.prefix):]} changed while it was "
                              "being copied")
            r = self._call(what, "complete_multipart_upload", write=True, Key=dst_key,
                           UploadId=upload_id, MultipartUpload={"Parts": parts})
        except BaseException:
            self._abort_multipart(dst_key, upload_id)
            raise
        return self._check_published(name, _etag(r.get("ETag")), size, own)

    def rename(self, old: str, new: str) -> ImageInfo:
        """Server-side copy, then delete the source only if it is still what was copied: a
        source replaced meanwhile is kept (and the rename reported as failed), never lost."""
        self._writable()
        check_name(new)
        src_key = self._key(old)
        pinned = self._head_raw(src_key)
        src = self._info(old, pinned)
        info = self._copy(src_key, self._key(new), src.meta, pinned, src.size)
        if not self._same_source(src_key, pinned):
            raise Changed(f"{self.id}/{old} was replaced during the rename; {new} holds the "
                          "version that was renamed and the new one stays under the old name")
        self._call(f"{self.id}/{old}", "delete_object", write=True, Key=src_key,
                   **({"IfMatch": f'"{src.version}"'} if self._conditional_delete else {}))
        return ImageInfo(name=new, size=info.size, mtime=info.mtime, mode=info.mode,
                         version=info.version, meta=info.meta)

    def delete(self, name: str) -> None:
        self._writable()
        self.stat(name)  # S3 deletes of missing keys succeed; ENOENT must still be ENOENT
        self._call(f"{self.id}/{name}", "delete_object", write=True, Key=self._key(name))

    def set_meta(self, name: str, meta: Mapping[str, str], expect: str | None = None
                 ) -> ImageInfo:
        """S3 metadata is fixed at creation: replace it by copying the object onto itself (the
        copy is conditional on the ETag seen, so ``expect`` holds through it)."""
        self._writable()
        pinned = self._head_raw(self._key(name))
        cur = self._info(name, pinned)
        if expect is not None and cur.version != expect:
            raise Changed(f"{self.id}/{name} is no longer version {expect}")
        merged = {**cur.meta, **meta}
        if META_MODE in merged:
            merged[META_MODE] = f"{int(merged[META_MODE], 8) & 0o7777:o}"
        return self._copy(self._key(name), self._key(name), merged, pinned, cur.size)

    # ------------------------------------------------------------------ leftovers
    def cleanup_leftovers(self) -> int:
        """Abort uploads and delete hidden objects whose owner is gone (see module doc)."""
        if self.read_only:
            return 0
        removed = 0
        now = time.time()
        tag = self.prefix + UPLOAD_TAG

        def condemned(key: str, when: Any) -> bool:
            state = owner_state(key[len(tag):])
            if state == "dead":
                return True
            age = now - when.timestamp() if when is not None else 0.0
            return state == "elsewhere" and age > self.options["leftover_age"]

        def stale_copy(key: str, when: Any) -> bool:
            """A multipart copy onto an image's own key (rename, metadata change of a large
            image) whose process died: nothing names its owner, so only age condemns it."""
            name = key[len(self.prefix):]
            if "/" in name or when is None:
                return False
            return now - when.timestamp() > self.options["leftover_age"]

        pages = self.s3.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket, Prefix=self.prefix)
        try:
            for page in pages:
                for up in page.get("Uploads") or ():
                    key, when = up["Key"], up.get("Initiated")
                    if (condemned(key, when) if key.startswith(tag)
                            else stale_copy(key, when)):
                        self._abort_multipart(key, up["UploadId"])
                        removed += 1
        except Exception as e:
            raise self._error(e, f"store {self.id}: listing uploads") from None
        for entry in self._names(tag):
            if condemned(entry["Key"], entry.get("LastModified")):
                self._delete_key_quietly(entry["Key"])
                removed += 1
        return removed

    # ------------------------------------------------------------------ discovery
    def _glance_base(self) -> str:
        """``scheme://host`` as glance_store's S3 driver writes it: ``s3+https`` for an https
        endpoint, ``s3`` for any other (it says ``s3://`` of http hosts too, and connects to
        its own ``s3_store_host`` whatever the location says); AWS: ``s3.amazonaws.com``."""
        url = self.options.get("endpoint_url")
        if not url:
            return "s3+https://s3.amazonaws.com"
        parts = urlsplit(url)
        scheme = "s3+https" if parts.scheme == "https" else "s3"
        return f"{scheme}://{parts.netloc.rsplit('@', 1)[-1]}{parts.path.rstrip('/')}"

    def _glance_path(self, name: str) -> str:
        """``bucket/key``, verbatim as glance_store reads it: it takes the last two parts of
        the path for bucket and key and decodes nothing, so a key with '/' (a prefix such as
        "glance/images/") or '@' has no Glance location (``Unsupported``)."""
        return f"{self.bucket}/{glance_literal(self._key(name), 'S3 key', also='@')}"

    def location(self, name: str) -> str:
        """Glance's S3 location without its credentials: ``s3://host/bucket/key``. Enough to
        say where the image is; glance_store itself can read only ``glance_location``."""
        return f"{self._glance_base()}/{self._glance_path(name)}"

    def glance_location(self, name: str) -> str:
        """``s3://ACCESS:SECRET@host/bucket/key``, the location glance_store 4.1 writes and
        reads: its driver takes credentials only from the location. Root only (see
        ``Store.glance_location``); credentials as this store uses them (``access_key_id`` and
        its secret file, else the profile or AWS environment boto3 resolves)."""
        access, secret = self._glance_credentials()
        for what, value, bad in (("access key id", access, ":@/?#"),
                                 ("secret access key", secret, ":@?#")):
            if not value or any(c in value for c in bad) or \
                    any(ord(c) < 0x21 or ord(c) == 0x7f for c in value):
                raise Unsupported(f"store {self.id}: the {what} cannot be written in a Glance "
                                  f"location (glance_store splits it at ':', '@', '?', '#')")
        scheme, host = self._glance_base().split("://", 1)
        return f"{scheme}://{access}:{secret}@{host}/{self._glance_path(name)}"

    def _glance_credentials(self) -> tuple[str, str]:
        """The key pair this store signs with, read afresh (the secret is kept nowhere)."""
        o = self.options
        if o.get("access_key_id"):
            try:
                with open(o["secret_access_key_file"]) as f:
                    return o["access_key_id"], f.read().strip()
            except OSError as e:
                raise BackendError(f"store {self.id}: cannot read secret_access_key_file: "
                                   f"{e.strerror}") from None
        import boto3

        creds = boto3.session.Session(profile_name=o.get("profile")).get_credentials()
        if creds is None:
            raise Unsupported(f"store {self.id}: no credentials to write in a Glance location")
        frozen = creds.get_frozen_credentials()
        if frozen.token:
            raise Unsupported(f"store {self.id}: temporary credentials (a session token) "
                              f"cannot be written in a Glance location")
        return frozen.access_key, frozen.secret_key

    def properties(self) -> dict[str, str]:
        props = {"bucket": self.bucket, "prefix": self.prefix}
        if self.options.get("endpoint_url"):
            parts = urlsplit(self.options["endpoint_url"])
            props["endpoint_url"] = parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]).geturl()
        if self.options.get("region"):
            props["region"] = self.options["region"]
        return props

    def usage(self) -> tuple[int, int] | None:
        count = total = 0
        for entry in self._names(self.prefix):
            if not is_hidden(entry["Key"][len(self.prefix):]):
                count += 1
                total += int(entry.get("Size") or 0)
        return count, total

