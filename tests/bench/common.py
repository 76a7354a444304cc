"""Helpers shared by the benchmark scripts: timing dd/cp runs and printing ratio tables."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
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
