"""``imagefs copy``, ``hash`` and ``verify``: Glance multi-store chores as one-liners on a mount.

They work on paths inside a mounted imagefs, so they need nothing but the mount: the source is
read once, every destination is written concurrently from the same chunks, and each
destination's hash (computed by imagefs while the bytes stream in, see ``writer``) is compared
with the hash of what was read. Without ``--allow-partial`` any failure removes the copies this
command made, like Glance's all_stores_must_succeed. A destination that fails (or every one,
when reading the source fails) drops its pending bytes through ``user.imagefs.discard`` before
closing, so no truncated copy is ever published. An image already present in a destination is
left alone when its size and md5 match (idempotent re-runs) and otherwise refused, unless
``--replace``; a roll-back therefore removes only images this command created or replaced.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

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


def _store_dir(image: Path) -> Path:
    """MOUNTPOINT/STORE/IMAGE → the real STORE directory (``default`` is a symlink to it),
    checking it really is an imagefs store directory."""
    store_dir = image.parent.resolve()
    if _xattr(store_dir, "type") is None:
        raise UsageError(f"{image} is not an image in an imagefs store directory")
    return store_dir


def _mount_root(image: Path) -> Path:
    """MOUNTPOINT/STORE/IMAGE → MOUNTPOINT."""
    return _store_dir(image).parent


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


#: Queue item telling a destination to drop its pending bytes instead of publishing them.
ABANDON = object()


@dataclass
class Destination:
    store: str
    path: Path
    q: queue.Queue[object] = field(default_factory=lambda: queue.Queue(maxsize=4))
    error: str | None = None
    #: This command published an image under ``path`` (so a roll-back may remove it).
    published: bool = False
    #: Overwrite an image already there (``--replace``); otherwise one that appears under
    #: ``path`` after the checks is left alone (O_EXCL) and this destination fails.
    replace: bool = False

    def run(self) -> None:
        """Write chunks until None (publish) or ABANDON (discard); a failure is recorded and
        the queue is still drained. A destination that fails or is abandoned never publishes:
        ``user.imagefs.discard`` drops the pending bytes before the close, so the name keeps
        whatever it held before (nothing, unless ``--replace``)."""
        f = None
        chunk: object = b""
        try:
            f = open(self.path, "wb" if self.replace else "xb")
            while (chunk := self.q.get()) is not None and chunk is not ABANDON:
                assert isinstance(chunk, bytes)
                f.write(chunk)
            g, f = f, None
            if chunk is ABANDON:
                self._discard(g)
            else:
                g.close()  # publishes; upload errors surface here
                self.published = True
        except OSError as e:
            self.error = f"{self.store}: {e.strerror or e}"
            if f is not None:
                self._discard(f)
                f = None
            # Keep taking chunks so the reader never blocks on this queue, unless the end
            # marker was already taken (the close itself failed).
            while chunk is not None and chunk is not ABANDON:
                chunk = self.q.get()

    def _discard(self, f: BinaryIO) -> None:
        try:
            os.setxattr(f.fileno(), XA + "discard", b"1")
        except OSError as e:
            self.error = self.error or f"{self.store}: could not discard the partial copy: {e}"
        try:
            f.close()
        except OSError:
            pass


def _same_image(src: Path, dst: Path) -> bool:
    """``dst`` already holds the source's bytes, by size and stored md5 (no read needed)."""
    want = _xattr(src, "checksum")
    return (want is not None and _xattr(dst, "checksum") == want
            and src.stat().st_size == dst.stat().st_size)


def _targets(args: argparse.Namespace, stores: dict[str, Path], here: str) -> list[str]:
    if args.all_stores:
        return [s for s in stores if s != here and _xattr(stores[s], "read_only") != "true"]
    targets = list(dict.fromkeys(t for t in (args.to or "").split(",") if t))
    unknown = [t for t in targets if t not in stores]
    if unknown:
        raise UsageError(f"unknown store(s): {', '.join(unknown)} (stores: {', '.join(stores)})")
    ro = [t for t in targets if _xattr(stores[t], "read_only") == "true"]
    if ro:
        raise UsageError(f"store(s) {', '.join(ro)} are read-only; nothing was copied")
    if here in targets:
        raise UsageError(f"{here} is the source's own store")
    return targets


def copy(args: argparse.Namespace) -> int:
    given = Path(args.source).absolute()
    store_dir = _store_dir(given)
    src, here = store_dir / given.name, store_dir.name
    if not src.is_file():
        raise UsageError(f"{given}: no such image")
    stores = _store_dirs(store_dir.parent)
    targets = _targets(args, stores, here)
    if not targets:
        raise UsageError("no destination store (use --to STORE[,STORE...] or --all-stores)")
    present, clash = [], []
    for t in targets:
        dst = stores[t] / src.name
        if dst.exists():
            (present if _same_image(src, dst) else clash).append(t)
    if clash and not args.replace:
        raise UsageError(f"{src.name} already exists, with other content or no stored hash, "
                         f"in: {', '.join(clash)}; nothing was copied (--replace overwrites)")
    for t in present:
        print(f"{t}: {stores[t] / src.name} already holds this image (same size and md5)")
    todo = [t for t in targets if t not in present]
    if not todo:
        return EXIT_OK
    algo = _xattr(src, "os_hash_algo") or "sha512"
    dests = [Destination(t, stores[t] / src.name, replace=args.replace) for t in todo]
    threads = [threading.Thread(target=d.run, daemon=True) for d in dests]
    for t in threads:
        t.start()
    h, md5 = hashlib.new(algo), hashlib.md5(usedforsecurity=False)
    size = src.stat().st_size
    progress = Progress(size)
    read_error = None
    end: object = ABANDON
    try:
        with open(src, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                md5.update(chunk)
                for d in dests:
                    if d.error is None:
                        d.q.put(chunk)
                progress.add(len(chunk))
        end = None
    except OSError as e:
        read_error = f"reading {src}: {e.strerror or e}"
    finally:  # also on ^C: every destination is told how to end, then waited for
        for d in dests:
            d.q.put(end)
        for t in threads:
            t.join()
        progress.end()
    digest, md5sum = h.hexdigest(), md5.hexdigest()
    for d in dests:
        if d.published:
            # The destination hashed the bytes as they arrived; md5 always, the multihash when
            # the destination mount uses the same algorithm.
            got_md5 = _xattr(d.path, "checksum")
            got = _xattr(d.path, "os_hash_value")
            same_algo = _xattr(d.path, "os_hash_algo") == algo
            if got_md5 != md5sum or (same_algo and got != digest):
                d.error = f"{d.store}: hash mismatch after copy (md5 {got_md5} != {md5sum})"
                _remove(d)  # wrong bytes never stay, whatever the mode
        elif d.error is None:
            d.error = f"{d.store}: not copied"
    failed = [d for d in dests if d.error]
    if read_error:
        print(f"imagefs copy: {read_error}; no copy was published", file=sys.stderr)
    for d in failed:
        print(f"imagefs copy: {d.error}", file=sys.stderr)
    if failed and not args.allow_partial:
        removed = [d.store for d in dests if d.published and _remove(d)]
        print("imagefs copy: failed; " + (f"removed the copies it made in {', '.join(removed)}"
                                          if removed else "no copy was kept"), file=sys.stderr)
        return EXIT_FAILED
    ok = [d for d in dests if not d.error]
    for d in ok:
        print(f"{d.store}: {d.path} {algo}:{digest}")
    if failed:
        return EXIT_PARTIAL if ok or present else EXIT_FAILED
    return EXIT_OK


def _remove(d: Destination) -> bool:
    """Remove a copy this command published; True if it is gone."""
    try:
        os.unlink(d.path)
    except FileNotFoundError:
        pass
    except OSError as e:
        print(f"imagefs copy: {d.store}: could not remove {d.path}: {e.strerror or e}",
              file=sys.stderr)
        return False
    d.published = False
    return True


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
    """Hash the bytes of one version and store the three values in one update, which the mount
    refuses (ESTALE) if the image was replaced meanwhile: a hash never labels other bytes."""
    path = Path(args.image).absolute()
    _mount_root(path)
    algo = args.algo or _xattr(_store_dir(path), "hash_algo") or "sha512"
    version = _xattr(path, "version")
    if version is None:
        raise UsageError(f"{path}: no such image")
    value, md5 = _hash_file(path, algo)
    doc = {"version": version, "os_hash_algo": algo, "os_hash_value": value, "checksum": md5}
    try:
        os.setxattr(path, XA + "hashes", json.dumps(doc).encode())
    except OSError as e:
        if e.errno == errno.ESTALE:
            print(f"imagefs hash: {path} was replaced while it was read; nothing stored, "
                  "run it again", file=sys.stderr)
        else:
            print(f"imagefs hash: {path}: cannot store the hashes: {e.strerror}",
                  file=sys.stderr)
        return EXIT_FAILED
    print(f"{path}: {algo}:{value} md5:{md5}")
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
