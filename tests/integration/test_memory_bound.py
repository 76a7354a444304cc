"""Memory is bounded by the [cache] settings, whatever the number of readers: eight readers of
eight different images at once keep the daemon's resident memory within its budget."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from tests.integration.test_common import MiB
from tests.mounting import daemon_pid


def _rss(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


def test_eight_readers_stay_within_the_memory_budget(s3_store_table: dict[str, Any],
                                                     mount_factory: Any,
                                                     tmp_path: Path) -> None:
    memory, prefetch = 32 * MiB, 32 * MiB
    cache = {"memory_size": "32MiB", "max_prefetch_memory": "32MiB", "readahead": "16MiB",
             "disk_size": "0"}
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        for _ in range(48):
            f.write(os.urandom(MiB))
    m = mount_factory({"s": s3_store_table}, cache=cache)
    for i in range(8):
        subprocess.run(["cp", str(src), str(m.path("s", f"img{i}.raw"))], check=True)
    # A fresh daemon for the reads: what the uploads left allocated does not count.
    m = mount_factory({"s": s3_store_table}, cache=cache)
    pid = daemon_pid(m)
    os.listdir(m.path("s"))
    base = _rss(pid)
    peak = base
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        readers = [subprocess.Popen(["dd", f"if={m.path('s', f'img{i}.raw')}", "of=/dev/null",
                                     "bs=4M", "status=none"]) for i in range(8)]
        for r in readers:
            assert r.wait(timeout=600) == 0
    finally:
        done.set()
        sampler.join()
    # The memory cache and the prefetch budget; the kernel's read requests in flight, which
    # imagefs must answer (max_background = 64, 1 MiB each); and 48 MiB for the allocator's
    # slack and the store threads' buffers. None of it grows with images or readers.
    budget = memory + prefetch + 64 * MiB + 48 * MiB
    assert peak - base <= budget, (f"resident memory grew by {(peak - base) / MiB:.0f} MiB "
                                   f"(budget {budget / MiB:.0f} MiB)")
