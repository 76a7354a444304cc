"""The boto3 client of one S3 store: how it is configured, and what its failures mean.

botocore's own retry configuration ("standard" mode) retries what is safe; each attempt is
bounded by the store's ``timeout``, so a dead endpoint ends in ``BackendError`` (EIO), never a
hang. The secret is read from ``secret_access_key_file`` when the client is made and kept
nowhere else; it is never logged.
"""

from __future__ import annotations

from typing import Any

from imagefs.stores.base import BackendError, Changed, InvalidName, NoSpace, NotFound, ReadOnly
from imagefs.stores.s3.layout import error_code
from imagefs.stores.s3.options import S3Options
from imagefs.stores.secrets import read_secret_file


def read_secret(store_id: str, opts: S3Options) -> str | None:
    """The secret access key from its file (None: boto3 resolves credentials itself)."""
    if not opts.secret_access_key_file:
        return None
    return read_secret_file(store_id, "secret_access_key_file", opts.secret_access_key_file)


def _rgw_copy_if_match(request: Any, **_: Any) -> None:
    """Ceph RGW ignores ``x-amz-copy-source-if-match`` on CopyObject but honours its own
    ``x-amz-copy-if-match``: send both, so the copy is pinned to the version on either."""
    value = request.headers.get("x-amz-copy-source-if-match")
    if value is not None and "x-amz-copy-if-match" not in request.headers:
        request.headers["x-amz-copy-if-match"] = value


def connect(store_id: str, opts: S3Options, timeout: float, connections: int) -> Any:
    """A boto3 S3 client for the store, with room for ``connections`` requests at once."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(profile_name=opts.profile,
                                    aws_access_key_id=opts.access_key_id,
                                    aws_secret_access_key=read_secret(store_id, opts))
    config = Config(
        region_name=opts.region,
        signature_version="s3v4",
        # Every PUT carries the SHA-256 of its body in its signature, which the server
        # checks (botocore does it anyway over plain http): the integrity check of each
        # part, at 1.6 GB/s, where a Content-MD5 cost a second pass at half that speed.
        s3={"addressing_style": opts.addressing_style, "payload_signing_enabled": True},
        retries={"mode": "standard", "max_attempts": opts.max_attempts},
        connect_timeout=min(timeout, 10.0),
        read_timeout=timeout,
        max_pool_connections=connections,
        tcp_keepalive=True,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    verify: bool | str = opts.ca_bundle or opts.verify_tls
    client = session.client("s3", endpoint_url=opts.endpoint_url, config=config, verify=verify)
    if opts.endpoint_url:
        client.meta.events.register("before-sign.s3.CopyObject", _rgw_copy_if_match)
    return client


def map_error(e: BaseException, what: str, write: bool = False) -> Exception:
    """A botocore/urllib3 failure as the store error the FUSE layer understands."""
    code, status = error_code(e)  # type: ignore[arg-type]
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
    return BackendError(f"{what}: {type(e).__name__}: {e}")
