"""The keys of a ``type = "s3"`` table, typed, and the checks across them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from imagefs.options import OptionError, option
from imagefs.stores.owners import leftover_age_option
from imagefs.stores.s3.layout import BUCKET, MAX_PART, MIN_PART, MiB


@dataclass(frozen=True)
class S3Options:
    endpoint_url: str | None = option("str", help="S3 endpoint; omitted: AWS")
    bucket: str = option("str", required=True)
    prefix: str = option("str", default="")
    region: str | None = option("str")
    profile: str | None = option("str", help="a profile of the AWS shared config/credentials")
    access_key_id: str | None = option("str")
    secret_access_key_file: str | None = option("secret_file",
                                                help="file holding the secret access key")
    addressing_style: str = option(("path", "virtual", "auto"), default="auto")
    ca_bundle: str | None = option("path")
    verify_tls: bool = option("bool", default=True)
    part_size: int = option("size", default=8 * MiB)
    upload_concurrency: int = option("int", default=4)
    upload_memory: int = option("size", default=64 * MiB)
    multipart_copy_threshold: int = option("size", default=MAX_PART)
    max_attempts: int = option("int", default=4)
    leftover_age: float = leftover_age_option()


def check(options: Mapping[str, Any]) -> None:
    """Cross-key checks beyond types, for the config loader (raises ``OptionError``)."""
    if not BUCKET.match(options["bucket"]):
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
