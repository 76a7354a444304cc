"""``imagefs copy``, ``hash`` and ``verify``: Glance multi-store chores as one-liners on a mount.

They work on paths inside a mounted imagefs, so they need nothing but the mount: the source is
read once, every destination is written concurrently from the same chunks, and each
destination's hash (computed by imagefs while the bytes stream in, see ``writer``) is compared
with the hash of what was read. Without ``--allow-partial`` any failure removes the copies this
command made, like Glance's all_stores_must_succeed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CHUNK = 4 << 20
XA = "user.imagefs."
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_HASH, EXIT_PARTIAL = 0, 1, 2, 3, 4


class UsageError(Exception):
    pass


def _xattr(path: Path, key: str) -> str | None:
    try:
        return os.getxattr(path, XA + key).decode()
    except OSError:
        return None


def _mount_root(image: Path) -> Path:
    """MOUNTPOINT/STORE/IMAGE → MOUNTPOINT, checking it really is an imagefs store directory."""
    store_dir = image.parent
    if _xattr(store_dir, "type") is None:
        raise UsageError(f"{image} is not an image in an imagefs store directory")
    return store_dir.parent


def _store_dirs(root: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(root.iterdir())
            if not p.is_symlink() and p.is_dir() and _xattr(p, "type") is not None}


class Progress:
    """Bytes, rate and ETA on stderr, only when it is a terminal."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.t0 = time.monotonic()
        self.tty = sys.stderr.isatty()
        self._last = 0.0

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.tty and (now - self._last > 0.2 or self.done >= self.total):
            self._last = now
            rate = self.done / max(now - self.t0, 1e-6)
            eta = (self.total - self.done) / rate if rate else 0
            pct = 100 * self.done / self.total if self.total else 100
            sys.stderr.write(f"\r{self.done / 2**20:10.1f} MiB {pct:5.1f}% "
                             f"{rate / 2**20:8.1f} MiB/s ETA {eta:5.0f}s")
            sys.stderr.flush()

    def end(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


@dataclass
class Destination:
    store: str
    path: Path
    q: queue.Queue[bytes | None] = field(default_factory=lambda: queue.Queue(maxsize=4))
    error: str | None = None
    made: bool = False

    def run(self) -> None:
        """Write chunks until None; a failure is recorded and the queue is still drained."""
        f = None
        try:
            f = open(self.path, "wb")
            self.made = True
            while (chunk := self.q.get()) is not None:
                f.write(chunk)
            f.close()  # publishes; upload errors surface here
            f = None
        except OSError as e:
            self.error = f"{self.store}: {e.strerror or e}"
            while self.q.get() is not None:
                pass
        finally:
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass


def copy(args: argparse.Namespace) -> int:
    src = Path(args.source).absolute()
    root = _mount_root(src)
    stores = _store_dirs(root)
    here = src.parent.name
    if args.all_stores:
        targets = [s for s in stores if s != here and _xattr(stores[s], "read_only") != "true"]
    else:
        targets = [t for t in (args.to or "").split(",") if t]
        unknown = [t for t in targets if t not in stores]
        if unknown:
            raise UsageError(f"unknown store(s): {', '.join(unknown)} "
                             f"(stores: {', '.join(stores)})")
        ro = [t for t in targets if _xattr(stores[t], "read_only") == "true"]
        if ro:
            raise UsageError(f"store(s) {', '.join(ro)} are read-only; nothing was copied")
        if here in targets:
            raise UsageError(f"{here} is the source's own store")
    if not targets:
        raise UsageError("no destination store (use --to STORE[,STORE...] or --all-stores)")
    algo = _xattr(src, "os_hash_algo") or "sha512"
    dests = [Destination(t, stores[t] / src.name) for t in targets]
    threads = [threading.Thread(target=d.run, daemon=True) for d in dests]
    for t in threads:
        t.start()
    h, md5 = hashlib.new(algo), hashlib.md5(usedforsecurity=False)
    size = src.stat().st_size
    progress = Progress(size)
    read_error = None
    try:
        with open(src, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                md5.update(chunk)
                for d in dests:
                    if d.error is None:
                        d.q.put(chunk)
                progress.add(len(chunk))
    except OSError as e:
        read_error = f"reading {src}: {e.strerror or e}"
    finally:
        for d in dests:
            d.q.put(None)
        for t in threads:
            t.join()
        progress.end()
    digest, md5sum = h.hexdigest(), md5.hexdigest()
    for d in dests:
        if d.error is None and read_error is None:
            # The destination hashed the bytes as they arrived; md5 always, the multihash when
            # the destination mount uses the same algorithm.
            got_md5 = _xattr(d.path, "checksum")
            got = _xattr(d.path, "os_hash_value")
            same_algo = _xattr(d.path, "os_hash_algo") == algo
            if got_md5 != md5sum or (same_algo and got != digest):
                d.error = f"{d.store}: hash mismatch after copy (md5 {got_md5} != {md5sum})"
    failed = [d for d in dests if d.error or read_error]
    ok = [d for d in dests if d not in failed]
    for d in failed:
        print(f"imagefs copy: {d.error or read_error}", file=sys.stderr)
    if failed and not args.allow_partial:
        for d in dests:
            if d.made:
                try:
                    os.unlink(d.path)
                except OSError:
                    pass
        print(f"imagefs copy: failed; removed the copies made ({', '.join(t for t in targets)})",
              file=sys.stderr)
        return EXIT_FAILED
    for d in ok:
        print(f"{d.store}: {d.path} {algo}:{digest}")
    if failed:
        return EXIT_PARTIAL if ok else EXIT_FAILED
    return EXIT_OK


def _hash_file(path: Path, algo: str) -> tuple[str, str]:
    h, md5 = hashlib.new(algo), hashlib.md5(usedforsecurity=False)
    progress = Progress(path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            md5.update(chunk)
            progress.add(len(chunk))
    progress.end()
    return h.hexdigest(), md5.hexdigest()


def hash_cmd(args: argparse.Namespace) -> int:
    path = Path(args.image).absolute()
    _mount_root(path)
    value, md5 = _hash_file(path, args.algo)
    for key, v in (("os_hash_algo", args.algo), ("os_hash_value", value), ("checksum", md5)):
        os.setxattr(path, XA + key, v.encode())
    print(f"{path}: {args.algo}:{value} md5:{md5}")
    return EXIT_OK


def verify_cmd(args: argparse.Namespace) -> int:
    path = Path(args.image).absolute()
    _mount_root(path)
    algo, want = _xattr(path, "os_hash_algo"), _xattr(path, "os_hash_value")
    if not algo or not want:
        print(f"imagefs verify: {path} has no stored hash (run: imagefs hash {path})",
              file=sys.stderr)
        return EXIT_NO_HASH
    got, md5 = _hash_file(path, algo)
    checksum = _xattr(path, "checksum")
    if got != want or (checksum and checksum != md5):
        print(f"imagefs verify: {path}: MISMATCH: stored {algo}:{want}, read {got}",
              file=sys.stderr)
        return EXIT_FAILED
    print(f"{path}: OK {algo}:{got}")
    return EXIT_OK


def main(args: argparse.Namespace) -> int:
    try:
        return {"copy": copy, "hash": hash_cmd, "verify": verify_cmd}[args.command](args)
    except UsageError as e:
        print(f"imagefs {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"imagefs {args.command}: {e}", file=sys.stderr)
        return EXIT_FAILED
