"""The one rule for replies to ranged GETs (imagefs/stores/ranges.py), case by case."""

from __future__ import annotations

import pytest

from imagefs.stores.base import BackendError
from imagefs.stores.ranges import Reply, check_reply, http_date


@pytest.mark.parametrize("status,content_range,content_length,offset,length,expect", [
    (206, "bytes 0-99/1000", 100, 0, 100, Reply(100, 1000)),
    (206, "bytes 900-999/1000", 100, 900, 200, Reply(100, 1000)),  # the object's end
    (206, "bytes 10-19/*", None, 10, 10, Reply(10, None)),
    (200, None, 50, 0, 100, Reply(50, 50)),  # a range covering the object, answered whole
    (416, None, None, 1000, 10, Reply(0, None)),
])
def test_replies_that_are_the_bytes_asked_for(status: int, content_range: str | None,
                                              content_length: int | None, offset: int,
                                              length: int, expect: Reply) -> None:
    assert check_reply("x", status, content_range, content_length, offset, length) == expect


@pytest.mark.parametrize("status,content_range,content_length,offset,length,why", [
    (206, "bytes 1-100/1000", 100, 0, 100, "bad Content-Range"),  # another start
    (206, "bytes 0-49/1000", 50, 0, 100, "not the 100 bytes"),  # short, not at the end
    (206, "bytes 0-199/1000", 200, 0, 100, "not the 100 bytes"),  # more than asked
    (206, "bytes 0-99/1000", 99, 0, 100, "99 body bytes"),
    (206, "bytes */1000", 0, 0, 100, "bad Content-Range"),
    (206, None, 100, 0, 100, "bad Content-Range"),
    (200, None, 1000, 0, 100, "ignores Range"),  # the whole object, larger than asked
    (200, None, 1000, 500, 100, "ignores Range"),  # past offset 0: never
    (200, None, None, 0, 100, "ignores Range"),  # no length: cannot tell
    (500, None, None, 0, 100, "HTTP 500"),
])
def test_replies_that_are_not(status: int, content_range: str | None,
                              content_length: int | None, offset: int, length: int,
                              why: str) -> None:
    with pytest.raises(BackendError, match=why):
        check_reply("x", status, content_range, content_length, offset, length)


def test_http_dates() -> None:
    assert http_date("Wed, 21 Oct 2015 07:28:00 GMT") == 1445412480.0
    assert http_date(None) == http_date("yesterday") == 0.0
