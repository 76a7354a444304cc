"""``imagefs status MOUNTPOINT``: what a running mount is doing, from the daemon itself.

Transport: a unix stream socket beside the daemon's pid file (``/run/imagefs/HASH.sock`` as
root), mode 0600, answered by a thread of the daemon: connect, read one JSON document, done.
Why a socket and not a virtual xattr on the mount root:

* it answers from its own thread, without a FUSE request, so ``status`` does not queue
  behind file system requests: when a backend hangs and every FUSE worker waits on it, or
  the FUSE loop itself is stuck, which is when an operator needs it most (an xattr would be
  one more request in that queue, and ``getfattr`` would hang with it); the client asks
  without stat'ing the mount point either;
* access is the socket file's permission (the user who mounted, root under systemd), not
  whoever can reach the mount point (everyone with ``allow_other``);
* no size limit (an xattr value stops at 64 KiB) and no change to the FUSE operations.

The report holds counters (imagefs.stats), live state (open handles, uploads in flight) and
the daemon's pid, uptime and memory; never a credential: store ids and image names only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagefs import stats

if TYPE_CHECKING:
    from imagefs.fs import ImageFS

log = logging.getLogger(__name__)

Report = dict[str, Any]


def socket_for(pidfile: Path) -> Path:
    """The status socket of the mount whose pid file is ``pidfile`` (see daemon.pidfile_for)."""
    return pidfile.with_suffix(".sock")


def report(fs: ImageFS, mountpoint: str, config_path: str) -> Report:
    """Counters plus what ``fs`` holds open right now; safe from any thread."""
    out = stats.snapshot()
    out["mountpoint"] = mountpoint
    out["config"] = config_path
    now = fs.activity()
    for sid, store in fs.stores.items():
        row = out["stores"].setdefault(sid, stats.snapshot_empty())
        row["type"] = store.type_name
        row["open_handles"] = now.open_handles.get(sid, 0)
        row["uploads"] = []
    for p in now.pending:
        out["stores"][p.store_id]["uploads"].append(
            {"image": p.name, "bytes": p.size, "publishing": p.publishing})
    return out


def uploads_in_flight(fs: ImageFS) -> int:
    """Images being written and not yet published (for systemd's STATUS line)."""
    return len(fs.activity().pending)


class StatusServer:
    """Answers every connection to ``path`` with ``make_report()`` as JSON, in a thread."""

    def __init__(self, path: Path, make_report: Callable[[], Report]) -> None:
        self.path = path
        self.make_report = make_report
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # 0600 from the start: no window where others may connect
        try:
            self.sock.bind(str(path))
        finally:
            os.umask(old)
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, name="imagefs-status", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            with conn:
                conn.settimeout(5)  # a reader that does not read must not block the next
                try:
                    conn.sendall(json.dumps(self.make_report()).encode())
                except Exception as e:  # a status reader must never take the daemon down
                    log.warning("status: cannot answer: %s", e)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.path.unlink(missing_ok=True)


class StatusError(Exception):
    """Why the status of a mount cannot be had, for the person who asked."""


def query(sock_path: Path, timeout: float = 10.0) -> Report:
    """Read the report of the daemon listening on ``sock_path``."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(sock_path))
        chunks = []
        while chunk := s.recv(1 << 16):
            chunks.append(chunk)
    except FileNotFoundError:
        raise StatusError(f"no imagefs mount there (no status socket {sock_path})") from None
    except PermissionError:
        raise StatusError(f"{sock_path}: permission denied (the status socket is readable "
                          "by the user who mounted only; root under systemd)") from None
    except ConnectionRefusedError:
        raise StatusError(f"{sock_path}: the daemon is not running") from None
    except TimeoutError:
        raise StatusError(f"{sock_path}: no answer within {timeout:g}s") from None
    finally:
        s.close()
    return json.loads(b"".join(chunks))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _duration(s: float) -> str:
    s = int(s)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d" if d else "") + (f"{h}h" if d or h else "") + f"{m}m{s:02d}s"


def _ratio(c: dict[str, int]) -> str:
    total = c["hits"] + c["misses"]
    return f"{100 * c['hits'] / total:.0f}% of {total}" if total else "-"


def format_text(r: Report) -> str:
    """The report as an operator reads it in a terminal."""
    lines = [f"imagefs on {r['mountpoint']} (config {r['config']}): pid {r['pid']}, "
             f"up {_duration(r['uptime_seconds'])}, RSS {_size(r['rss_bytes'])} "
             f"(peak {_size(r['peak_rss_bytes'])})", ""]
    head = ("STORE", "TYPE", "READ", "WRITTEN", "REQUESTS", "ERRORS", "MEMORY HITS",
            "DISK HITS", "OPEN", "UPLOADS")
    rows = [head]
    for sid, s in r["stores"].items():
        errors = ",".join(f"{k}:{v}" for k, v in sorted(s["errors"].items())) or "0"
        rows.append((sid, s.get("type", ""), _size(s["read_bytes"]), _size(s["written_bytes"]),
                     str(s["requests"]), errors, _ratio(s["cache"]["memory"]),
                     _ratio(s["cache"]["disk"]), str(s.get("open_handles", 0)),
                     str(len(s.get("uploads", [])))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
              for row in rows]
    uploads = [(sid, u) for sid, s in r["stores"].items() for u in s.get("uploads", [])]
    if uploads:
        lines += ["", "uploads in flight:"]
        lines += [f"  {sid}/{u['image']}: {_size(u['bytes'])} so far"
                  + (" (publishing)" if u["publishing"] else "") for sid, u in uploads]
    return "\n".join(lines)
