"""Helpers shared by the benchmark scripts: timing dd/cp runs and printing ratio tables."""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

MiB = 1 << 20


def drop_caches() -> None:
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def dd(src: Path | str, dst: Path | str, bs: str = "4M", extra: tuple[str, ...] = ()) -> None:
    subprocess.run(["dd", f"if={src}", f"of={dst}", f"bs={bs}", "status=none", *extra],
                   check=True)


def report(title: str, size: int, rows: list[tuple[str, float, str]]) -> None:
    """rows: (label, seconds, reference label or ''); prints MB/s and ratio to the reference."""
    speeds = {label: size / secs / 1e6 for label, secs, _ in rows}
    print(f"\n== {title} ({size / MiB:.0f} MiB)")
    for label, _secs, ref in rows:
        ratio = f"  {speeds[label] / speeds[ref]:5.2f}x of {ref}" if ref else ""
        print(f"  {label:<44} {speeds[label]:8.1f} MB/s{ratio}")


def write_random(path: Path, size: int) -> Path:
    """A file of *size* random bytes (incompressible, so no layer can shortcut it)."""
    with open(path, "wb") as f:
        for off in range(0, size, MiB):
            f.write(os.urandom(min(MiB, size - off)))
    return path


def mbps(size: int, secs: float) -> float:
    """Decimal MB/s, as dd and the README tables report them."""
    return size / secs / 1e6


def median(values: Sequence[float]) -> float:
    """Median of several runs: one noisy run (another job on the machine) does not move it."""
    return float(statistics.median(values))


def proc_status_kib(pid: int, field: str) -> int:
    """A ``kB`` field of ``/proc/PID/status`` (e.g. ``VmHWM``: peak resident set size)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value.split()[0])
    raise KeyError(f"{field} not in /proc/{pid}/status")
