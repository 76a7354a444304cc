"""An in-memory store and a kernel-free file system, for fast tests of the filesystem logic.

Not a stand-in for any backend (the integration tests use real ones): it exists to drive
``FileSystem`` (or its FUSE glue ``ImageFS``) operations directly, in the orders the kernel
may deliver them, to hold a backend call open (``gates``) so a race window is as wide as a
test needs, deterministically, and to make one call fail (``failures``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from imagefs.cache import BlockCache, MemoryCache
from imagefs.filesystem import FileSystem, FsSettings
from imagefs.fs import ImageFS
from imagefs.reader import BlockSource
from imagefs.stores.base import (
    BackendError,
    Capability,
    Changed,
    ImageInfo,
    NotFound,
    Store,
    Upload,
    meta_mode,
    meta_mtime,
)
from imagefs.writer import WriterSettings


@dataclass
class _Object:
    data: bytes
    version: str
    meta: dict[str, str] = field(default_factory=dict)


class Gate:
    """A backend call that waits until the test opens it; ``reached`` tells it is waiting."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.reached = threading.Event()

    def wait(self) -> None:
        self.reached.set()
        if not self.open.wait(30):
            raise BackendError("gate never opened")


class MemUpload(Upload):
    def __init__(self, store: MemStore, name: str) -> None:
        self.store, self.name = store, name
        self.buf = bytearray()
        self.aborted = False

    def _alive(self) -> None:
        if self.aborted:
            raise BackendError(f"{self.name}: upload already aborted")

    def write(self, offset: int, data: bytes) -> None:
        self.store.hold("write")
        self._alive()
        if not self.store.random_write and offset != len(self.buf):
            raise BackendError(f"{self.name}: write at {offset}, expected {len(self.buf)}")
        if offset > len(self.buf):
            self.buf.extend(bytes(offset - len(self.buf)))
        self.buf[offset:offset + len(data)] = data

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.buf[offset:offset + length])

    def truncate(self, size: int) -> None:
        del self.buf[size:]
        self.buf.extend(bytes(size - len(self.buf)))

    def commit(self, meta: Mapping[str, str]) -> ImageInfo:
        self.store.hold("commit")
        self._alive()
        return self.store.put(self.name, bytes(self.buf), dict(meta))

    def abort(self) -> None:
        self.store.hold("abort")
        self.aborted = True


class MemStore(Store):
    """Images in a dict. ``random_write`` picks the writer's direct or spool strategy."""

    type_name = "memory"

    def __init__(self, store_id: str = "m", random_write: bool = False,
                 read_only: bool = False) -> None:
        cfg = SimpleNamespace(id=store_id, description="", read_only=read_only, default=True,
                              weight=0, timeout=10.0, options={}, concurrency=4,
                              chown="refuse")
        super().__init__(cfg)
        self.random_write = random_write
        self.capabilities = Capability.RANDOM_WRITE if random_write else Capability(0)
        self.objects: dict[str, _Object] = {}
        self.gates: dict[str, Gate] = {}
        #: The next call of that kind ("write", "commit", "abort", "read") raises this, once.
        self.failures: dict[str, BaseException] = {}
        self._n = 0

    def hold(self, what: str) -> None:
        gate = self.gates.get(what)
        if gate is not None:
            gate.wait()
        failure = self.failures.pop(what, None)
        if failure is not None:
            raise failure

    def put(self, name: str, data: bytes, meta: dict[str, str]) -> ImageInfo:
        with self._lock:
            self._n += 1
            self.objects[name] = _Object(data, f"v{self._n}", meta)
        return self.stat(name)

    def list(self) -> Iterator[ImageInfo]:
        return iter([self.stat(n) for n in list(self.objects)])

    def stat(self, name: str) -> ImageInfo:
        o = self.objects.get(name)
        if o is None:
            raise NotFound(name)
        return ImageInfo(name=name, size=len(o.data), mtime=meta_mtime(o.meta, time.time()),
                         mode=meta_mode(o.meta), version=o.version, meta=dict(o.meta))

    def read_range(self, name: str, version: str, offset: int, length: int) -> bytes:
        self.hold("read")
        o = self.objects.get(name)
        if o is None or o.version != version:
            raise Changed(name)
        return o.data[offset:offset + length]

    def upload(self, name: str, size_hint: int | None = None) -> Upload:
        return MemUpload(self, name)

    def rename(self, old: str, new: str) -> ImageInfo:
        self.objects[new] = self.objects.pop(old)
        return self.stat(new)

    def delete(self, name: str) -> None:
        if self.objects.pop(name, None) is None:
            raise NotFound(name)

    def set_meta(self, name: str, meta: Mapping[str, str], expect: str | None = None
                 ) -> ImageInfo:
        o = self.objects[name]
        if expect is not None and o.version != expect:
            raise Changed(name)
        o.meta.update(meta)
        return self.stat(name)

    def location(self, name: str) -> str:
        return f"memory://{self.id}/{name}"


def _settings(spool_dir: Path, **kwargs: Any) -> FsSettings:
    return FsSettings(ttl=1.0, readahead=4 << 20,
                      writer=WriterSettings(spool_dir=spool_dir, hash_algo="sha512"),
                      uid=os.getuid(), gid=os.getgid(), **kwargs)


def _source() -> Any:
    cache = BlockCache(MemoryCache(16 << 20), None)
    return lambda n: BlockSource(cache, 1 << 20, 16 << 20, n)


def make_fs(store: MemStore, spool_dir: Path) -> ImageFS:
    """An ImageFS over ``store`` with small caches; call ``fs.bind(nursery)`` before use."""
    return ImageFS([store], _source(), _settings(spool_dir))


def make_filesystem(stores: list[MemStore], spool_dir: Path, **settings: Any) -> FileSystem:
    """The semantics layer alone over ``stores`` (``FsSettings`` fields as keywords); call
    ``bind(nursery)`` before use."""
    return FileSystem(list(stores), _source(), _settings(spool_dir, **settings))


#: What pyfuse3 passes as ``ctx``: the calling process is this one.
CTX: Any = SimpleNamespace(pid=os.getpid(), uid=os.getuid(), gid=os.getgid(), umask=0o022)
