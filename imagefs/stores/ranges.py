"""One rule for replies to a ranged GET, shared by every HTTP-speaking store (s3, swift, http).

Integrity rests on it (a reply that is not exactly the bytes asked for must never reach a
reader), and three stores each checking it their own way had drifted apart: one sliced a 200
reply wherever the range started, one accepted it at offset 0 only, one refused it. The rule:

* **206**: ``Content-Range`` must start at the offset asked for and end where the range asked
  for ends, or at the object's end if that comes first; the body must be that long.
* **200**: the whole object. Servers may answer so when the range covers all of it (asked
  at offset 0 for at least the object's size): then it is exactly the bytes asked for. Any
  other 200 is a server that ignores ``Range``; reading it would mean fetching (and, past
  offset 0, dropping) up to the whole image for each block, so it is an error at the first
  read, not a slow mount or one that fails a block later.
* **416**: the range starts at or past the end of the object: no bytes.
* anything else is an error; stores map 404 and 412 themselves before asking.
"""

from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass

from imagefs.stores.base import BackendError

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


@dataclass(frozen=True)
class Reply:
    """What a checked reply holds: ``length`` body bytes, from an object of ``total`` bytes
    (None where the server did not say)."""

    length: int
    total: int | None


def check_reply(what: str, status: int, content_range: str | None,
                content_length: int | None, offset: int, length: int) -> Reply:
    """Check a reply to ``Range: bytes=offset-(offset+length-1)`` against the module's rule.

    ``content_length`` is the body's length where known before reading it (None: check the
    body read against ``Reply.length`` instead). Raises ``BackendError`` naming ``what``."""
    if status == 416:
        return Reply(0, None)
    if status == 200:
        if offset != 0 or content_length is None or content_length > length:
            raise BackendError(f"{what}: HTTP 200 (the whole object, {content_length} bytes) "
                               f"to a ranged GET of {length} bytes at offset {offset}: the "
                               f"server ignores Range (expected 206)")
        return Reply(content_length, content_length)
    if status != 206:
        raise BackendError(f"{what}: HTTP {status} to a ranged GET (expected 206)")
    m = _CONTENT_RANGE.match(content_range or "")
    if not m or int(m.group(1)) != offset or int(m.group(2)) < offset:
        raise BackendError(f"{what}: bad Content-Range {content_range!r} for offset {offset}")
    got = int(m.group(2)) - offset + 1
    total = int(m.group(3)) if m.group(3) != "*" else None
    want = length if total is None else min(length, total - offset)
    if got != want:
        raise BackendError(f"{what}: Content-Range {content_range!r} is not the "
                           f"{want} bytes asked for")
    if content_length is not None and content_length != got:
        raise BackendError(f"{what}: {content_length} body bytes, Content-Range says {got}")
    return Reply(got, total)


def http_date(value: str | None) -> float:
    """An HTTP date header as a timestamp; 0.0 if it is missing or not a date."""
    if not value:
        return 0.0
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return 0.0
