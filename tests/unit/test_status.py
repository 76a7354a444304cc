"""``imagefs status`` reads what a mount holds open through ``ImageFS.activity()``."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import trio

from imagefs import status
from tests.memstore import CTX, MemStore, make_fs


def test_the_report_lists_open_handles_and_unpublished_uploads(tmp_path: Path) -> None:
    store = MemStore()
    fs = make_fs(store, tmp_path)
    seen: dict[str, status.Report] = {}

    async def main() -> None:
        async with trio.open_nursery() as n:
            fs.bind(n)
            fi, _ = await fs.create(fs.inodes.store_ino["m"], b"img", stat.S_IFREG | 0o644,
                                    os.O_WRONLY | os.O_CREAT, CTX)
            await fs.write(fi.fh, 0, b"u" * 1234)
            seen["writing"] = status.report(fs, "/mnt", "/etc/imagefs.toml")
            assert status.uploads_in_flight(fs) == 1
            await fs.flush(fi.fh)
            await fs.release(fi.fh)
            seen["closed"] = status.report(fs, "/mnt", "/etc/imagefs.toml")
            n.cancel_scope.cancel()

    trio.run(main)
    row = seen["writing"]["stores"]["m"]
    assert row["open_handles"] == 1 and row["type"] == "memory"
    assert row["uploads"] == [{"image": "img", "bytes": 1234, "publishing": False}]
    assert seen["closed"]["stores"]["m"]["open_handles"] == 0
    assert seen["closed"]["stores"]["m"]["uploads"] == []
