"""CPU cost of the disk cache: the one-file-per-block layout of ``main`` against this tree's.

    .venv/bin/python -m tests.bench.bench_disk_cache [--blocks 512] [--runs 5] [--dir DIR]

Measures CPU seconds (user + sys of this process, all threads: getrusage) rather than MB/s,
so that other jobs on the machine move the numbers less. Each run, for each layout in turn
(alternating which goes first), in a fresh directory:

- store: ``--blocks`` 1 MiB blocks offered to ``WriteBehind`` (its two threads, as the daemon
  runs them) and its ``close`` waited for; the cache holds them all;
- read: every block read back by ``DISK_READERS`` threads (the reader's limit), from the
  page cache (no caches are dropped: the cache's own cost is measured, not the disk's);
- evict: as many new blocks again into the full cache, so each put evicts one.

Dirty pages are written back by the kernel's flusher threads, which are not counted. The old
layout is ``git show REF:imagefs/cache.py`` (``--ref``, default main) loaded as its own module.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import ModuleType

from imagefs import cache as new_cache
from imagefs.reader import DISK_READERS
from tests.bench.common import MiB

GiB = 1 << 30


def load_old(ref: str, work: Path) -> ModuleType:
    src = subprocess.run(["git", "show", f"{ref}:imagefs/cache.py"], check=True,
                         capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout
    path = work / "cache_old.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("cache_old", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(mod: ModuleType, root: Path, nblocks: int, pool: list[bytes]) -> dict[str, float]:
    max_bytes = nblocks * (MiB + 8192) + 4096  # exactly nblocks blocks in either layout
    disk = mod.DiskCache(root, max_bytes)
    out: dict[str, float] = {}

    def store(first: int) -> None:
        wb = mod.WriteBehind(disk, 64 << 20)  # the daemon's queue bound
        c0, t0 = cpu(), time.perf_counter()
        for i in range(first, first + nblocks):
            while not wb.offer(("bench", "v1", MiB, i), pool[i % len(pool)]):
                time.sleep(0.0005)  # full queue: the daemon would drop; here we wait
        assert wb.close(600)
        out[f"{'store' if first == 0 else 'evict'}_cpu"] = cpu() - c0
        out[f"{'store' if first == 0 else 'evict'}_wall"] = time.perf_counter() - t0

    store(0)
    assert disk.used <= max_bytes
    missing = [i for i in range(nblocks) if not disk.contains(("bench", "v1", MiB, i))]
    assert not missing, f"{len(missing)} blocks not stored"

    def read(part: range) -> None:
        for i in part:
            got = disk.get(("bench", "v1", MiB, i))
            assert got is not None and len(got) == MiB, i

    threads = [threading.Thread(target=read, args=(range(k, nblocks, DISK_READERS),))
               for k in range(DISK_READERS)]
    c0, t0 = cpu(), time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["read_cpu"], out["read_wall"] = cpu() - c0, time.perf_counter() - t0
    assert all(bytes(disk.get(("bench", "v1", MiB, i)) or b"") == pool[i % len(pool)]
               for i in range(0, nblocks, 37))
    store(nblocks)
    assert disk.used <= max_bytes
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.bench_disk_cache")
    p.add_argument("--blocks", type=int, default=512)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--ref", default="main")
    p.add_argument("--dir", type=Path, default=None, help="where the caches go (default /tmp)")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="imagefs-bench-dc-", dir=args.dir))
    try:
        layouts = {"old (files)": load_old(args.ref, work), "new (slab)": new_cache}
        pool = [os.urandom(MiB) for _ in range(32)]
        gib = args.blocks * MiB / GiB
        print(f"{args.blocks} x 1 MiB blocks, {args.runs} runs, load average "
              f"{os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs")
        results: dict[str, list[dict[str, float]]] = {name: [] for name in layouts}
        for run in range(args.runs):
            order = list(layouts) if run % 2 == 0 else list(reversed(layouts))
            for name in order:
                root = work / f"{run}-{name.split()[0]}"
                results[name].append(measure(layouts[name], root, args.blocks, pool))
                shutil.rmtree(root)
                r = results[name][-1]
                print(f"  run {run} {name:<11} CPU s/GiB: store {r['store_cpu'] / gib:5.2f}  "
                      f"read {r['read_cpu'] / gib:5.2f}  evict {r['evict_cpu'] / gib:5.2f}   "
                      f"wall s: store {r['store_wall']:5.2f} read {r['read_wall']:5.2f} "
                      f"evict {r['evict_wall']:5.2f}")
        print(f"load average at the end {os.getloadavg()[0]:.2f}")
        print("\nmedian [min-max] over the runs")
        for name, rows in results.items():
            cells = []
            for what in ("store", "read", "evict"):
                v = [r[f"{what}_cpu"] / gib for r in rows]
                w = [r[f"{what}_wall"] for r in rows]
                cells.append(f"{what} {statistics.median(v):5.2f} [{min(v):.2f}-{max(v):.2f}] "
                             f"CPU s/GiB, wall {statistics.median(w):.2f} s")
            print(f"  {name:<11} " + ";  ".join(cells))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
