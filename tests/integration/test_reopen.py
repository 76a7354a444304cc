"""Close and reopen at once (fsx -c, qemu-img opening one image several times), on every store.

The kernel sends RELEASE after close() has returned, so the next open() can reach the daemon
while the last close of the previous descriptor is still publishing and dropping its spool or
upload. The new descriptor must start from what that close published, never share the writer
being dropped (that published mostly zeros without an error on Swift).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

from tests.integration.test_common import MiB


def _model_write(model: bytearray, off: int, data: bytes) -> None:
    if off > len(model):
        model.extend(bytes(off - len(model)))
    model[off:off + len(data)] = data


def _model_truncate(model: bytearray, size: int) -> None:
    if size < len(model):
        del model[size:]
    else:
        model.extend(bytes(size - len(model)))


def test_close_then_reopen_for_writing_keeps_every_byte(
        store_table: dict[str, Any], mount_factory: Any) -> None:
    """Write and truncate through one O_RDWR descriptor, close, reopen right away, read,
    write, close: every read and the final image equal a local model, cycle after cycle."""
    m = mount_factory({"s": store_table})
    path = m.path("s", "fsx.raw")
    rng = random.Random(11)
    model = bytearray()
    for cycle in range(25):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            off = rng.randrange(0, 2 * MiB)
            data = rng.randbytes(rng.randrange(1, 300_000))
            assert os.pwrite(fd, data, off) == len(data)
            _model_write(model, off, data)
            size = rng.randrange(MiB, 3 * MiB)
            os.ftruncate(fd, size)
            _model_truncate(model, size)
        finally:
            os.close(fd)
        fd = os.open(path, os.O_RDWR)  # at once: the release above may still be running
        try:
            roff = rng.randrange(0, len(model))
            got = os.pread(fd, 65536, roff)
            assert got == bytes(model[roff:roff + 65536]), f"cycle {cycle}: read at {roff}"
            off = rng.randrange(0, len(model))
            data = rng.randbytes(rng.randrange(1, 100_000))
            os.pwrite(fd, data, off)
            _model_write(model, off, data)
        finally:
            os.close(fd)
    assert Path(path).read_bytes() == bytes(model)
    # A fresh mount reads what the backend holds, not what this daemon remembers.
    m2 = mount_factory({"s": store_table}, cache={"disk_size": "0"})
    assert Path(m2.path("s", "fsx.raw")).read_bytes() == bytes(model)
