"""The one mapping from errors to errno values, and the error the file system layer raises.

Stores raise ``StoreError`` subclasses and know no errno; the file system semantics
(imagefs.filesystem and its helpers) raise those, ``OSError`` from local I/O, or ``FsError``
for a refusal that is its own (EBUSY for a rename under a writer, ETXTBSY for a shrink under
readers...). imagefs.fs turns any of them into the FUSE reply, and ``bridge`` counts the errno
a store call ends in, both through ``errno_of``.
"""

from __future__ import annotations

import errno

from imagefs.stores.base import (
    BackendError,
    Busy,
    Changed,
    InvalidName,
    NoSpace,
    NotFound,
    ReadOnly,
    StoreError,
    Unsupported,
)

_ERRNO: dict[type[StoreError], int] = {
    NotFound: errno.ENOENT,
    ReadOnly: errno.EROFS,
    NoSpace: errno.ENOSPC,
    Busy: errno.EBUSY,
    InvalidName: errno.EINVAL,
    Unsupported: errno.EOPNOTSUPP,
    Changed: errno.EIO,
    BackendError: errno.EIO,
}

#: Errno values that are the caller's own business (a name that does not exist, a refused
#: change): logged at debug level only.
QUIET = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.EXDEV, errno.EROFS,
         errno.EOPNOTSUPP, errno.ENODATA, errno.EPERM, errno.EINVAL, errno.ENAMETOOLONG,
         errno.EISDIR, errno.ENOTDIR, errno.EACCES}


class FsError(Exception):
    """A refusal decided by the file system semantics itself: the reply is ``errno``, and
    whatever needed logging was logged where the decision was made."""

    def __init__(self, code: int) -> None:
        super().__init__(errno.errorcode.get(code, str(code)))
        self.errno = code


def errno_of(e: BaseException) -> int:
    if isinstance(e, FsError):
        return e.errno
    for cls in type(e).__mro__:
        if cls in _ERRNO:
            return _ERRNO[cls]  # type: ignore[index]
    if isinstance(e, OSError) and e.errno:
        return e.errno
    return errno.EIO
