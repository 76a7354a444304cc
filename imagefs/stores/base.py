"""The one small interface every store type implements, and the errors stores may raise.

Stores are synchronous because their client libraries are (boto3, swiftclient, librados/librbd).
The FUSE layer calls them from worker threads, so every method may block; none may hang forever:
each store bounds its backend calls with its configured timeout and raises ``BackendError``.

Only ``imagefs.errors`` maps these exceptions to errno values; stores never know about FUSE.
"""

from __future__ import annotations

import enum
import os
import re
import stat as stat_mod
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from imagefs.options import Option, OptionError, StoreConfig, spec_of

__all__ = ["OptionError"]  # stores raise it from check_options

#: Prefix of backend-side names used for uploads in progress; no listing ever shows them and
#: users cannot create names with it.
HIDDEN_PREFIX = ".imagefs-"

#: Metadata keys imagefs itself maintains on every image it writes.
META_MTIME = "mtime"
META_MODE = "mode"
#: Owner kept as metadata by stores configured with ``chown = "keep"``.
META_UID = "uid"
META_GID = "gid"

DEFAULT_MODE = stat_mod.S_IFREG | 0o644


class Capability(enum.Flag):
    """What a store can do beyond the interface every store has; the writer and fs consult it."""

    #: Uploads take writes at any offset and can be read back and truncated (rbd, file,
    #: cinder); others get strictly sequential offsets (the writer spools otherwise).
    RANDOM_WRITE = enum.auto()


class StoreError(Exception):
    """Base of every error a store raises; ``str()`` is meant for the log."""


class NotFound(StoreError):
    """The image does not exist (ENOENT)."""


class Changed(StoreError):
    """The image changed since it was opened; serving bytes now could mix two versions (EIO)."""


class ReadOnly(StoreError):
    """The store (or backend) refuses writes (EROFS)."""


class NoSpace(StoreError):
    """The backend is out of space or quota (ENOSPC)."""


class Busy(StoreError):
    """The image is in use in a way that forbids the operation, e.g. RBD clones exist (EBUSY)."""


class InvalidName(StoreError):
    """The name cannot be stored in this backend (EINVAL / ENAMETOOLONG)."""


class Unsupported(StoreError):
    """The store cannot do this operation at all (EOPNOTSUPP)."""


class BackendError(StoreError):
    """Anything else the backend said or failed to say (EIO).

    There is no "retryable" flag (there was one; nothing read it): each store retries its
    transient failures itself, within its own timeout, and ``bridge.call``'s deadline bounds
    the whole call; a second retry layer above them would stretch the time to EIO that
    doc/SEMANTICS.md ("How long stopping takes") promises."""


@dataclass(frozen=True)
class ImageInfo:
    """What a store knows about one published image.

    ``version`` changes whenever the bytes change (ETag, RBD image id, mtime_ns+size...); every
    cache key includes it so a replaced image is never served from stale blocks.
    """

    name: str
    size: int
    mtime: float
    mode: int = DEFAULT_MODE
    version: str = ""
    meta: Mapping[str, str] = field(default_factory=dict)


_NAME_MAX = 255


def check_name(name: str) -> None:
    """Refuse names no store may hold (doc/SEMANTICS.md, "Names").

    Raises ``InvalidName``; the message says why, for the log.
    """
    if not name or name in (".", ".."):
        raise InvalidName(f"invalid image name {name!r}")
    if "/" in name or "\0" in name:
        raise InvalidName(f"image name {name!r} contains '/' or NUL")
    if len(name.encode("utf-8", "surrogateescape")) > _NAME_MAX:
        raise InvalidName(f"image name longer than {_NAME_MAX} bytes")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 arrive as lone surrogates
        raise InvalidName(f"image name {name!r} is not valid UTF-8") from None
    if name.startswith(HIDDEN_PREFIX):
        raise InvalidName(f"names starting with {HIDDEN_PREFIX!r} are reserved for uploads")


def is_hidden(name: str) -> bool:
    """True for backend names that listings must never show."""
    return name.startswith(HIDDEN_PREFIX)


#: Characters glance_store cannot take literally in the last parts of a location: it splits
#: them with ``urlparse`` (which drops tabs and newlines and ends at '?' or '#') and does not
#: percent-decode them (rbd:// URLs aside, which are quoted instead).
_NOT_IN_GLANCE_URL = re.compile(r"[/?#\x00-\x1f\x7f]")


def glance_literal(text: str, what: str, also: str = "") -> str:
    """``text`` as glance_store needs it in a file://, swift or s3 location: verbatim. Names
    with '/', '?', '#', control characters, a trailing space or one of ``also`` have no such
    form: they would parse as another object, or not at all (``Unsupported``, saying why)."""
    bad = _NOT_IN_GLANCE_URL.search(text) or (
        re.search("[" + re.escape(also) + "]", text) if also else None)
    if not text:
        raise Unsupported(f"{what} is empty")
    if bad or text.endswith(" "):
        char = bad.group() if bad else " "
        raise Unsupported(f"{what} {text!r} has no Glance location: glance_store takes it "
                          f"verbatim, and {char!r} would change what it names")
    return text


def meta_mtime(meta: Mapping[str, str], default: float) -> float:
    """Parse the persisted mtime, falling back to the backend's own timestamp."""
    try:
        return float(meta[META_MTIME])
    except (KeyError, ValueError):
        return default


def meta_mode(meta: Mapping[str, str]) -> int:
    """Parse the persisted mode (octal permission bits); regular file type is implied."""
    try:
        return stat_mod.S_IFREG | (int(meta[META_MODE], 8) & 0o7777)
    except (KeyError, ValueError):
        return DEFAULT_MODE


_SAFE_META_KEY = re.compile(r"^[a-z0-9_]+$")


def user_meta(meta: Mapping[str, str]) -> dict[str, str]:
    """Metadata worth persisting: lower-case simple keys only, so every backend can hold them."""
    return {k: str(v) for k, v in meta.items() if _SAFE_META_KEY.match(k)}


def read_padded(fd: int, length: int, offset: int) -> bytes:
    """``length`` bytes of the local file ``fd`` from ``offset``, zeros past its end (a size
    set by truncate beyond what was written)."""
    data = os.pread(fd, length, offset)
    return data + bytes(length - len(data)) if len(data) < length else data


class Upload(ABC):
    """An image being written; invisible under its name until ``commit``.

    Stores without the ``random_write`` capability receive strictly sequential offsets (the
    writer spools locally otherwise). ``read`` and ``truncate`` are only called on stores with
    ``random_write``.
    """

    @abstractmethod
    def write(self, offset: int, data: bytes) -> None: ...

    def write_from(self, fd: int, offset: int, length: int,
                   feed: Callable[[memoryview], None]) -> None:
        """Write ``length`` bytes of the local file ``fd`` from ``offset`` (zeros past its
        end) at the same offset, passing them in order to ``feed`` (the image's hashes).

        The writer's spool goes up through this. This default reads them into a new buffer;
        a store that holds its own part buffers reads straight into those instead (one copy
        and the page faults of a fresh buffer less per byte: the S3 write path was CPU-bound).
        """
        data = read_padded(fd, length, offset)
        self.write(offset, data)
        feed(memoryview(data))

    def read(self, offset: int, length: int) -> bytes:
        raise Unsupported("this upload cannot be read back")

    def truncate(self, size: int) -> None:
        raise Unsupported("this upload cannot be truncated")

    def flush(self) -> None:
        """Make what was written so far durable in the backend, still invisible (fsync)."""

    @abstractmethod
    def commit(self, meta: Mapping[str, str]) -> ImageInfo:
        """Publish atomically under the final name (replacing any previous image)."""

    @abstractmethod
    def abort(self) -> None:
        """Discard everything; must be safe to call twice and after a failed commit."""


class Store(ABC):
    """One configured store. Subclasses declare ``type_name`` and ``Options`` (or ``OPTIONS``).

    ``OPTIONS`` maps each type-specific config key to an ``imagefs.options.Option``; the config
    loader validates against it without importing backend libraries, so store modules import
    boto3/rados/swiftclient lazily.
    """

    type_name: ClassVar[str] = ""
    #: The store's own keys: a frozen dataclass of ``imagefs.options.option()`` fields.
    #: ``OPTIONS`` (the spec the loader checks) is derived from it.
    Options: ClassVar[type | None] = None
    OPTIONS: ClassVar[Mapping[str, Option]] = {}
    capabilities: ClassVar[Capability] = Capability(0)
    #: Local stores are served without the block cache (it would only copy local bytes).
    local: ClassVar[bool] = False
    #: Backend calls allowed at once from this store (worker threads).
    default_concurrency: ClassVar[int] = 8

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("Options") is not None:
            cls.OPTIONS = spec_of(cls.Options)

    def __init__(self, cfg: StoreConfig) -> None:
        self.cfg = cfg
        self.id: str = cfg.id
        self.description: str = cfg.description
        self.read_only: bool = cfg.read_only
        self.default: bool = cfg.default
        self.weight: int = cfg.weight
        self.timeout: float = cfg.timeout
        self.chown: str = getattr(cfg, "chown", "refuse")
        self.options: Mapping[str, Any] = cfg.options
        #: The typed form of ``options`` for stores that declare ``Options``.
        self.opts: Any = self.Options(**cfg.options) if self.Options is not None else None
        self._lock = threading.Lock()

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        """Cross-key checks beyond types (raise ``OptionError``); called by the config loader."""

    def _writable(self) -> None:
        """The guard every changing operation starts with."""
        if self.read_only:
            raise ReadOnly(f"store {self.id} is read-only")

    def open(self) -> None:
        """Connect to the backend; called once from a worker thread at mount time."""

    def close(self) -> None:
        """Release connections; called once at unmount."""

    def cleanup_leftovers(self) -> int:
        """Remove uploads a crash left behind; returns how many. Called once at mount."""
        return 0

    @abstractmethod
    def list(self) -> Iterator[ImageInfo]: ...

    @abstractmethod
    def stat(self, name: str) -> ImageInfo: ...

    @abstractmethod
    def read_range(self, name: str, version: str, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes (fewer only at end of image) of version ``version``.

        Raises ``Changed`` if the image is no longer that version.
        """

    def read_chunks(self, name: str, version: str, offset: int, length: int, chunk: int
                    ) -> Iterator[bytes]:
        """The range as consecutive ``chunk``-byte pieces (the last may be shorter), each
        handed on as soon as it is there: one backend request for many cache blocks, whose
        first blocks serve readers before the rest arrive. Same rules as ``read_range``.

        This default makes one ``read_range`` and cuts it; stores that can stream a reply
        (s3) override it."""
        data = self.read_range(name, version, offset, length)
        if len(data) <= chunk:
            if data:
                yield data
            return
        view = memoryview(data)
        for off in range(0, len(data), chunk):
            yield bytes(view[off:off + chunk])

    @abstractmethod
    def upload(self, name: str, size_hint: int | None = None) -> Upload: ...

    @abstractmethod
    def rename(self, old: str, new: str) -> ImageInfo:
        """Atomically replace ``new`` with ``old``'s image; returns the new image's info."""

    @abstractmethod
    def delete(self, name: str) -> None: ...

    @abstractmethod
    def set_meta(self, name: str, meta: Mapping[str, str], expect: str | None = None
                 ) -> ImageInfo:
        """Merge ``meta`` into the image's metadata (mtime, mode, hashes).

        With ``expect`` (a version), only if the image is still that version, checked in the
        same backend operation where the backend allows it; ``Changed`` otherwise. Hashes
        computed from one version must never be stored with another."""

    @abstractmethod
    def location(self, name: str) -> str:
        """The image's location URL in the form Glance records, without credentials.

        Only URLs glance_store parses back to this image: where Glance has no form for it
        (an RBD image without the snapshot Glance reads, an S3 key with '/'...), raise
        ``Unsupported`` saying why; the caller shows no location rather than a wrong one."""

    def glance_location(self, name: str) -> str:
        """The location glance_store itself would record and can read from, secrets and all
        (its S3 driver takes credentials only from the location). Only root may see it: the
        ``trusted.imagefs.glance_location`` xattr and ``imagefs location --glance``. Same
        rules as ``location``; stores whose Glance form has no secret return ``location``."""
        return self.location(name)

    def usage(self) -> tuple[int, int] | None:
        """(images, bytes) if the backend can tell cheaply, else None."""
        return None

    def properties(self) -> dict[str, str]:
        """Non-secret facts for discovery (Glance's store ``properties``)."""
        return {}
