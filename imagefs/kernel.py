"""Kernel-side settings of a FUSE mount that pyfuse3 cannot make at init.

Two limits shape sequential reads more than anything in the daemon: the mount's read-ahead
(``read_ahead_kb`` of its backing device, 128 KiB by default) caps how far ahead the kernel
asks, and ``max_background`` (12 by default) caps how many of those read-ahead requests may be
in flight at once. Both live in sysfs; the second only in the FUSE control file system
(``/sys/fs/fuse/connections``), which is mounted here when it is not. Everything is best
effort: a mount without them works, only slower, and says so in the log.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

CONNECTIONS = Path("/sys/fs/fuse/connections")


def _write(path: Path, value: int) -> bool:
    try:
        path.write_text(f"{value}\n")
        return True
    except OSError as e:
        log.info("could not set %s to %d: %s", path, value, e.strerror or e)
        return False


def _control_dir(dev: int) -> Path | None:
    """The mount's directory in the FUSE control file system, mounting that if needed."""
    d = CONNECTIONS / str(dev)
    if not d.is_dir() and CONNECTIONS.is_dir() and not os.path.ismount(CONNECTIONS):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", str(CONNECTIONS)],
                       capture_output=True, check=False)
    return d if d.is_dir() else None


def tune_connection(mountpoint: str, read_ahead_kib: int, max_background: int = 64) -> None:
    """Raise the mount's read-ahead and background-request limits (blocking: stats the mount
    point, so never call it from the thread that answers the mount's requests)."""
    dev = os.stat(mountpoint).st_dev
    _write(Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"), read_ahead_kib)
    ctl = _control_dir(dev)
    if ctl is None:
        log.info("FUSE control file system unavailable: max_background stays at the kernel's "
                 "default (sequential reads are slower)")
        return
    # congestion_threshold first: the kernel refuses neither order, but a threshold above
    # max_background would be meaningless for a moment.
    if _write(ctl / "max_background", max_background):
        _write(ctl / "congestion_threshold", max(1, max_background * 3 // 4))
