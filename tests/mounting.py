"""Mounting imagefs for tests: write a TOML config, run the real ``imagefs mount``, unmount.

Tests drive the mount with real programs (cp, rsync, dd, qemu-img, fio), so the mount runs as
its own daemon exactly as an operator would start it, and its log is printed when a test fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.backends import common

IMAGEFS = [sys.executable, "-m", "imagefs"]


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(doc: Mapping[str, Any]) -> str:
    """Minimal TOML writer for configs: scalars, lists and nested tables (tomllib only reads)."""
    lines: list[str] = []

    def table(prefix: str, t: Mapping[str, Any]) -> None:
        scalars = {k: v for k, v in t.items() if not isinstance(v, Mapping)}
        if prefix and (scalars or not t):
            lines.append(f"[{prefix}]")
        for k, v in scalars.items():
            lines.append(f"{k} = {_toml_value(v)}")
        for k, v in t.items():
            if isinstance(v, Mapping):
                table(f"{prefix}.{k}" if prefix else k, v)

    table("", doc)
    return "\n".join(lines) + "\n"


@dataclass
class Mount:
    root: Path
    config: Path
    log: Path

    def path(self, store: str, name: str = "") -> Path:
        return self.root / store / name if name else self.root / store

    def log_text(self) -> str:
        try:
            return self.log.read_text()
        except OSError:
            return ""


#: Test-sized cache limits, so tests exercise eviction and never fill the disk.
TEST_CACHE = {"memory_size": "64MiB", "disk_size": "256MiB"}


def write_config(where: Path, stores: Mapping[str, Mapping[str, Any]],
                 cache: Mapping[str, Any] | None = None, *, defaults: bool = False,
                 **top: Any) -> Path:
    """Write ``where/imagefs.toml``; the cache lives in ``where/cache``.

    Tests get :data:`TEST_CACHE` under *cache*; ``defaults=True`` sets nothing but
    ``cache.dir`` (plus *cache*), so benchmarks measure the shipped defaults.
    """
    cfg = where / "imagefs.toml"
    base = {"dir": str(where / "cache")} | ({} if defaults else TEST_CACHE)
    doc = {**top, "cache": {**base, **(cache or {})}, "stores": stores}
    cfg.write_text(to_toml(doc))
    return cfg


def mount(where: Path, stores: Mapping[str, Mapping[str, Any]], *,
          cache: Mapping[str, Any] | None = None, options: list[str] | None = None,
          debug: bool = True, defaults: bool = False, **top: Any) -> Mount:
    """Start a daemonized mount under ``where``; raises with the log if it does not come up.

    Tests mount with ``debug`` (every FUSE request logged, for post-mortems); benchmarks pass
    ``debug=False`` and ``defaults=True`` (see :func:`write_config`) to measure what an
    operator runs.
    """
    where.mkdir(parents=True, exist_ok=True)
    cfg = write_config(where, stores, cache, defaults=defaults, **top)
    mnt = where / "mnt"
    mnt.mkdir(exist_ok=True)
    log = where / "imagefs.log"
    opts = ["log=" + str(log)] + (["debug"] if debug else []) + list(options or [])
    r = subprocess.run([*IMAGEFS, "mount", str(cfg), str(mnt), "-o", ",".join(opts)],
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        text = log.read_text() if log.exists() else ""
        raise RuntimeError(f"imagefs mount failed ({r.returncode}): {r.stderr}\n{text[-4000:]}")
    # A run killed by SIGTERM/SIGHUP (CI timeout) unmounts it through the harness's hooks.
    common.install_cleanup_hooks()
    common.register_mount(mnt)
    return Mount(mnt, cfg, log)


def unmount(m: Mount, timeout: float = 120) -> None:
    """`imagefs umount`, falling back to a lazy unmount so a failed test leaves no mount."""
    if not common.mounted(m.root):  # also a dead mount (ENOTCONN), which ismount misses
        common.unmount(m.root)
        return
    r = subprocess.run([*IMAGEFS, "umount", str(m.root), "--timeout", str(timeout)],
                       capture_output=True, text=True, timeout=timeout + 30)
    if r.returncode != 0 and os.path.ismount(m.root):
        subprocess.run(["fusermount3", "-u", "-z", str(m.root)], capture_output=True)
        deadline = time.monotonic() + 10
        while os.path.ismount(m.root) and time.monotonic() < deadline:
            time.sleep(0.1)
    common.unmount(m.root)  # forgets it (and clears it if it is somehow still there)


def daemon_pid(m: Mount) -> int:
    """The pid of the daemon serving ``m`` (found by its command line)."""
    out = subprocess.run(["pgrep", "-f", f"imagefs mount {m.config}"], capture_output=True,
                         text=True).stdout.split()
    assert out, "daemon not found"
    return int(out[0])


def kill_daemon_mid_write(m: Mount, path: Path, hold: int = 30, *, nbytes: int = 300_000,
                          sig: int = signal.SIGKILL, wait: float = 10.0,
                          before: Callable[[], None] | None = None) -> bool:
    """Signal (SIGKILL unless ``sig``) the daemon of ``m`` while another process has ``path``
    open for writing with ``nbytes`` written and flushed (an upload in progress), after
    ``before()`` if given, and wait up to ``wait`` seconds for it to be gone: what a crash or
    a stop leaves for the next mount. Returns whether the daemon is gone."""
    pid = daemon_pid(m)
    holder = subprocess.Popen([sys.executable, "-c", (
        f"import sys,time; f=open(sys.argv[1],'wb'); f.write(b'N'*{nbytes}); f.flush();"
        f"print('ready',flush=True); time.sleep({hold})"), str(path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        if before is not None:
            before()
        os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        return not os.path.exists(f"/proc/{pid}")
    finally:
        holder.kill()
        holder.wait()


def tool(*names: str) -> None:
    """Fail clearly (CI) or skip (elsewhere) when a program the test drives is missing."""
    import pytest

    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        msg = f"programs not installed: {', '.join(missing)} (run tools/setup.sh)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
