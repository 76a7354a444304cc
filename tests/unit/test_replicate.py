"""``imagefs copy``'s per-destination writer: failures end the thread, never hang it."""

from __future__ import annotations

import threading
from pathlib import Path

from imagefs.replicate import ABANDON, Destination


def _run(d: Destination, items: list[object]) -> threading.Thread:
    t = threading.Thread(target=d.run, daemon=True)
    t.start()
    for item in items:
        d.q.put(item, timeout=10)
    t.join(timeout=10)
    return t


def test_failure_at_close_ends_the_destination() -> None:
    """The bytes are buffered and only the close fails (ENOSPC from /dev/full): the end
    marker was already taken, so the thread must not wait for another."""
    d = Destination("full", Path("/dev/full"), replace=True)
    t = _run(d, [b"abc", None])
    assert not t.is_alive()
    assert d.error is not None and "full:" in d.error
    assert not d.published


def test_failure_at_open_still_drains_the_queue(tmp_path: Path) -> None:
    d = Destination("gone", tmp_path / "no-such-dir" / "img.raw")
    t = _run(d, [b"x" * 10, b"y" * 10, b"z" * 10, b"w" * 10, b"v" * 10, ABANDON])
    assert not t.is_alive()
    assert d.error is not None and not d.published


def test_existing_image_is_not_overwritten_without_replace(tmp_path: Path) -> None:
    dst = tmp_path / "img.raw"
    dst.write_bytes(b"theirs")
    d = Destination("s", dst)
    t = _run(d, [b"mine", None])
    assert not t.is_alive()
    assert d.error is not None and not d.published
    assert dst.read_bytes() == b"theirs"
