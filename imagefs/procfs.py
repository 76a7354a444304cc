"""What /proc tells about a process: the facts imagefs decides on, read in one place.

FUSE names the caller of each request by thread id and nothing more, so the publish rules
(whose close is the writer's own, whether it is dying of a signal) and the leftover rules (is
the owner of an upload still running) rest on these reads. Each function is a few system
calls, blocks, and belongs in a worker thread (``bridge.local``) when called from trio.
"""

from __future__ import annotations

import os

_CAP_SYS_ADMIN = 21
_PF_EXITING = 0x4


def stat_fields(pid: int) -> list[bytes] | None:
    """``/proc/PID/stat`` after the command name (index 0 is field 3, the state), or None
    if there is no such process. The name may hold spaces and ')', hence the split on the
    last one."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot): with the pid, it identifies a process."""
    fields = stat_fields(pid)
    return fields[19].decode() if fields and len(fields) > 19 else None


def running(pid: int) -> bool:
    """Whether ``pid`` exists and has not exited (a zombie its parent has not reaped yet,
    e.g. a test or a supervisor that waits later, has exited)."""
    fields = stat_fields(pid)
    return bool(fields) and fields[0] != b"Z"  # type: ignore[index]


def _status_field(path: str, key: str) -> str | None:
    """The value of ``key:`` in a /proc file of ``key:\tvalue`` lines (status, fdinfo)."""
    with open(path) as f:
        for line in f:
            if line.startswith(key + ":"):
                return line.split()[1]
    return None


def process_of(tid: int) -> int:
    """The process (thread group) of thread ``tid``: FUSE names the calling thread, which may
    have ended by the time its file is closed, while the process goes on."""
    try:
        return int(_status_field(f"/proc/{tid}/status", "Tgid") or tid)
    except (OSError, ValueError):
        return tid


def has_sys_admin(tid: int) -> bool:
    """Whether thread ``tid`` has CAP_SYS_ADMIN in its effective set (False if it is gone)."""
    try:
        caps = _status_field(f"/proc/{tid}/status", "CapEff")
        return caps is not None and bool(int(caps, 16) >> _CAP_SYS_ADMIN & 1)
    except (OSError, ValueError):
        return False


def still_open_by(pid: int, path: str, ino: int | None = None) -> bool:
    """Whether process ``pid`` still has ``path`` (inode ``ino`` of this mount) open for
    writing (readlink and fdinfo only: no FUSE round trip).

    FUSE sends FLUSH for every close of every copy of a descriptor: a child that inherited it
    and calls exec, a dup being closed. By the time FLUSH arrives the closing descriptor is
    already gone from its table, so if the process that opened the file still lists it, this
    was not the writer's own close and publishing now would expose a half-written image.

    The inode decides where fdinfo shows it: the link of a descriptor may name the file as
    it was when it was opened, with " (deleted)" (the kernel drops the writer's dentry when
    another process's lookup of a still unpublished name gets ENOENT, and a later rename
    moves another dentry), and then no longer matches ``path``.
    """
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    mount_dir = os.path.dirname(os.path.dirname(path)) + "/"
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link != path and not link.startswith(mount_dir):
                continue
            flags, fd_ino = _fdinfo(pid, fd)
            if flags is not None and flags & os.O_ACCMODE == os.O_RDONLY:
                continue  # a reader of the image in the writing process does not count
            if link == path if ino is None or fd_ino is None else fd_ino == ino:
                return True
        except OSError:
            continue
    return False


def _fdinfo(pid: int, fd: str) -> tuple[int | None, int | None]:
    """The open flags and inode number of a descriptor (None where fdinfo lacks them)."""
    flags = ino = None
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == "flags":
                flags = int(value.strip(), 8)
            elif key == "ino":
                ino = int(value.strip())
    return flags, ino


def killed_by(pid: int) -> int:
    """The signal killing process ``pid`` if it is exiting because of one, else 0.

    A writer killed mid-copy (^C on cp, SIGKILL of qemu-img) still closes its files, and FUSE
    cannot tell that close from a finished write; publishing then would expose a partial
    image. While the process exits (PF_EXITING in /proc/PID/stat field 9) its exit code (field
    52) already holds the signal, and the close of its files waits for our answer.
    """
    fields = stat_fields(pid)
    try:
        flags, code = int(fields[6]), int(fields[49])  # type: ignore[index]
    except (TypeError, IndexError, ValueError):
        return 0
    return code & 0x7F if flags & _PF_EXITING else 0
