"""``type = "file"``: images are regular files in one local directory.

Every access goes through a directory file descriptor with ``O_NOFOLLOW`` and names that cannot
contain '/', so the store never touches anything outside its directory: symlinks are neither
listed nor followed. Uploads are hidden temporary files in the same directory, made durable
with fsync and published with rename(2), so a crash leaves either the old or the new image.
Hashes and other metadata live in ``user.imagefs.*`` xattrs; mtime and mode are the file's own.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import stat
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from imagefs.options import StoreConfig, option
from imagefs.stores.base import (
    HIDDEN_PREFIX,
    META_MODE,
    META_MTIME,
    BackendError,
    Capability,
    Changed,
    ImageInfo,
    InvalidName,
    NoSpace,
    NotFound,
    ReadOnly,
    Store,
    Upload,
    check_name,
    glance_literal,
    is_hidden,
)

_XATTR = "user.imagefs."


def _fail(e: OSError, what: str) -> Exception:
    if e.errno == errno.ENOENT:
        return NotFound(what)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"{what}: {e.strerror}")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return ReadOnly(f"{what}: {e.strerror}")
    if e.errno in (errno.ENAMETOOLONG, errno.ELOOP):
        return InvalidName(f"{what}: {e.strerror}")
    return BackendError(f"{what}: {e.strerror or e}")


_FS_IOC_GETVERSION = 0x80087601  # _IOR('v', 1, long): the inode's generation number


def _identity(st: os.stat_result, fd: int | None) -> str:
    """The inode, with its generation where the filesystem has one (ext4, xfs, btrfs): inode
    numbers are reused, so after two replacements the number alone may name other bytes."""
    if fd is not None:
        try:
            (gen,) = struct.unpack("q", fcntl.ioctl(fd, _FS_IOC_GETVERSION, bytes(8)))
            return f"{st.st_ino}g{gen}"
        except OSError:
            pass
    return str(st.st_ino)


def _version(st: os.stat_result, fd: int | None) -> str:
    """Identity first: our own writes always publish a new inode (temp file + rename)."""
    return f"{_identity(st, fd)}-{st.st_size}-{st.st_mtime_ns}"


def _same_version(fd: int, version: str) -> bool:
    """Whether ``fd`` holds the bytes of ``version``. With a generation number the identity
    decides, so chmod/utime on the same bytes do not fail open readers; without one, size and
    mtime must match too."""
    st = os.fstat(fd)
    if "g" in version.split("-", 1)[0]:
        return _identity(st, fd) == version.split("-", 1)[0]
    return _version(st, None) == version


class FileUpload(Upload):
    def __init__(self, store: FileStore, name: str) -> None:
        self.store = store
        self.name = name
        self.tmp = f"{HIDDEN_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        try:
            self.fd: int | None = os.open(
                self.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600, dir_fd=store.dirfd)
        except OSError as e:
            raise _fail(e, f"{store.id}: cannot create upload for {name}") from None

    def _fd(self) -> int:
        if self.fd is None:
            raise BackendError(f"{self.store.id}/{self.name}: upload already finished")
        return self.fd

    def write(self, offset: int, data: bytes) -> None:
        fd = self._fd()
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as e:
            raise _fail(e, f"{self.store.id}/{self.name}") from None

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd(), length, offset)

    def truncate(self, size: int) -> None:
        try:
            os.ftruncate(self._fd(), size)
        except OSError as e:
            raise _fail(e, f"{self.store.id}/{self.name}") from None

    def flush(self) -> None:
        os.fsync(self._fd())

    def commit(self, meta: Mapping[str, str]) -> ImageInfo:
        fd = self._fd()
        try:
            self.store._apply_meta(fd, meta)
            os.fsync(fd)
            os.rename(self.tmp, self.name, src_dir_fd=self.store.dirfd,
                      dst_dir_fd=self.store.dirfd)
            os.fsync(self.store.dirfd)
            info = self.store._info(self.name, os.fstat(fd), fd=fd)
        except OSError as e:
            self.abort()
            raise _fail(e, f"{self.store.id}/{self.name}: publish") from None
        os.close(fd)
        self.fd = None
        return info

    def abort(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            try:
                os.unlink(self.tmp, dir_fd=self.store.dirfd)
            except FileNotFoundError:
                pass


@dataclass(frozen=True)
class FileOptions:
    path: str = option("path", required=True, help="directory holding the images")


class FileStore(Store):
    type_name = "file"
    Options = FileOptions
    capabilities = Capability.RANDOM_WRITE
    local = True

    def __init__(self, cfg: StoreConfig) -> None:
        super().__init__(cfg)
        self.path = os.path.abspath(self.opts.path)
        self.dirfd = -1

    def open(self) -> None:
        try:
            self.dirfd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise BackendError(f"store {self.id}: cannot open directory {self.path}: "
                               f"{e.strerror}") from None

    def close(self) -> None:
        if self.dirfd >= 0:
            os.close(self.dirfd)
            self.dirfd = -1

    def cleanup_leftovers(self) -> int:
        """Remove uploads of daemons that are gone (their pid is in the name)."""
        removed = 0
        for entry in os.scandir(self.dirfd):
            if not is_hidden(entry.name):
                continue
            pid = entry.name[len(HIDDEN_PREFIX):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not os.path.exists(f"/proc/{pid}"):
                os.unlink(entry.name, dir_fd=self.dirfd)
                removed += 1
        return removed

    # ------------------------------------------------------------------ metadata
    def _open_image(self, name: str, flags: int = os.O_RDONLY) -> int:
        check_name(name)
        try:
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                         dir_fd=self.dirfd)
        except OSError as e:
            raise _fail(e, f"{self.id}/{name}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise NotFound(f"{self.id}/{name}: not a regular file")
        return fd

    def _info(self, name: str, st: os.stat_result, fd: int | None) -> ImageInfo:
        meta: dict[str, str] = {}
        if fd is not None:
            try:
                for key in os.listxattr(fd):
                    if key.startswith(_XATTR):
                        meta[key[len(_XATTR):]] = os.getxattr(fd, key).decode(errors="replace")
            except OSError:
                pass
        return ImageInfo(name=name, size=st.st_size, mtime=st.st_mtime_ns / 1e9,
                         mode=st.st_mode, version=_version(st, fd), meta=meta)

    def _apply_meta(self, fd: int, meta: Mapping[str, str]) -> None:
        for key, value in meta.items():
            if key == META_MODE:
                os.fchmod(fd, int(value, 8) & 0o7777)
            elif key != META_MTIME:
                try:
                    os.setxattr(fd, _XATTR + key, value.encode())
                except OSError as e:
                    if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                        raise
        if META_MTIME in meta:
            t = float(meta[META_MTIME])
            os.utime(fd, (t, t))

    def list(self) -> Iterator[ImageInfo]:
        for entry in os.scandir(self.dirfd):
            if is_hidden(entry.name):
                continue
            try:
                check_name(entry.name)
                fd = self._open_image(entry.name)
            except (NotFound, InvalidName):
                continue  # symlinks, directories, vanished files: not images
            try:
                yield self._info(entry.name, os.fstat(fd), fd)
            finally:
                os.close(fd)

    def stat(self, name: str) -> ImageInfo:
        fd = self._open_image(name)
        try:
            return self._info(name, os.fstat(fd), fd)
        finally:
            os.close(fd)

    def read_range(self, name: str, version: str, offset: int, length: int) -> bytes:
        fd = self._open_image(name)
        try:
            if not _same_version(fd, version):
                raise Changed(f"{self.id}/{name} changed since it was opened")
            return os.pread(fd, length, offset)
        except OSError as e:
            raise _fail(e, f"{self.id}/{name}") from None
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ changes
    def upload(self, name: str, size_hint: int | None = None) -> Upload:
        self._writable()
        check_name(name)
        return FileUpload(self, name)

    def rename(self, old: str, new: str) -> ImageInfo:
        self._writable()
        check_name(new)
        fd = self._open_image(old)  # refuses symlinks and non-files before renaming
        try:
            os.rename(old, new, src_dir_fd=self.dirfd, dst_dir_fd=self.dirfd)
            os.fsync(self.dirfd)
            return self._info(new, os.fstat(fd), fd)
        except OSError as e:
            raise _fail(e, f"{self.id}/{old} -> {new}") from None
        finally:
            os.close(fd)

    def delete(self, name: str) -> None:
        self._writable()
        os.close(self._open_image(name))
        try:
            os.unlink(name, dir_fd=self.dirfd)
        except OSError as e:
            raise _fail(e, f"{self.id}/{name}") from None

    def set_meta(self, name: str, meta: Mapping[str, str], expect: str | None = None
                 ) -> ImageInfo:
        self._writable()
        fd = self._open_image(name)
        try:
            if expect is not None and not _same_version(fd, expect):
                raise Changed(f"{self.id}/{name} is no longer version {expect}")
            self._apply_meta(fd, meta)
            return self._info(name, os.fstat(fd), fd)
        except OSError as e:
            raise _fail(e, f"{self.id}/{name}") from None
        finally:
            os.close(fd)

    def location(self, name: str) -> str:
        """``file:///DIR/NAME``, Glance's filesystem form: it takes the path verbatim."""
        return "file://" + os.path.join(self.path, glance_literal(name, "image name"))

    def usage(self) -> tuple[int, int] | None:
        images = list(self.list())
        return len(images), sum(i.size for i in images)

    def properties(self) -> dict[str, str]:
        return {"path": self.path}
