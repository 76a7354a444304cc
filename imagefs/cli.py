"""Command line of ``imagefs`` and ``mount.imagefs``: parsing and dispatch, no logic.

Exit status: 0 success, 1 the operation failed, 2 bad usage or bad configuration.
"""

from __future__ import annotations

import argparse
import errno
import os
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from imagefs import config as config_mod
from imagefs import hashing, procfs
from imagefs.daemon import MountError, MountOptions, pidfile_for

EXIT_FAIL = 1
EXIT_USAGE = 2


def _version() -> str:
    try:
        return version("imagefs")
    except PackageNotFoundError:
        return "0+unknown"


def _fail(msg: str, code: int = EXIT_FAIL) -> int:
    print(f"imagefs: {msg}", file=sys.stderr)
    return code


def _load(path: str) -> config_mod.Config:
    try:
        return config_mod.load(path)
    except config_mod.ConfigError as e:
        print(f"imagefs: {e}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def cmd_mount(args: argparse.Namespace) -> int:
    from imagefs import daemon

    try:
        opts = MountOptions.parse(args.o or [])
    except ValueError as e:
        return _fail(str(e), EXIT_USAGE)
    cfg = _load(args.config)
    try:
        # The real path: /proc/PID/fd shows it, and the writer checks compare with it.
        return daemon.mount(cfg, os.path.realpath(args.mountpoint), opts, args.foreground)
    except MountError as e:
        return _fail(str(e))


def _mounted(mountpoint: str) -> bool:
    from imagefs import daemon

    # A mount whose daemon died answers ENOTCONN, which os.path.ismount takes for "not mounted".
    return os.path.ismount(mountpoint) or daemon._is_imagefs_mount(mountpoint)


def cmd_umount(args: argparse.Namespace) -> int:
    from imagefs import daemon

    mnt = os.path.realpath(args.mountpoint)
    if not _mounted(mnt):
        return _fail(f"{mnt} is not mounted")
    pidfile = pidfile_for(mnt)
    if daemon._is_imagefs_mount(mnt) and not daemon._daemon_alive(pidfile):
        r = subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True, text=True)
        if r.returncode != 0:
            return _fail(f"cannot clear the dead mount {mnt}: {r.stderr.strip()}")
        print(f"imagefs: the daemon of {mnt} was no longer running; cleared the dead mount "
              "(uploads it had in flight were never published)", file=sys.stderr)
        return 0
    try:
        pid = int(pidfile.read_text())
    except (OSError, ValueError):
        pid = None
    deadline = time.monotonic() + args.timeout
    said = False
    while True:
        r = subprocess.run(["fusermount3", "-u", mnt], capture_output=True, text=True)
        if r.returncode == 0 or not _mounted(mnt):
            break
        if "busy" not in r.stderr.lower():
            return _fail(f"cannot unmount {mnt}: {r.stderr.strip()}")
        if time.monotonic() > deadline:
            return _fail(f"{mnt} is still busy after {args.timeout:g}s (open files or uploads "
                         "in flight); nothing was unmounted")
        if not said:
            print(f"imagefs: waiting for open files and uploads on {mnt} to finish...",
                  file=sys.stderr)
            said = True
        time.sleep(0.5)
    while pid is not None and procfs.running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)  # the daemon drains and closes its stores before exiting
    return 0


def _real_without_stat(path: str) -> str:
    """The real path of a mount point without a request to the mount itself (the parent is
    resolved; the last component, a mount point, is not a symbolic link)."""
    path = os.path.abspath(path).rstrip("/") or "/"
    parent, name = os.path.split(path)
    return os.path.join(os.path.realpath(parent), name) if name else path


def _status_socket(mnt: str) -> Path:
    """The socket of the mount on ``mnt``: this user's, else root's (a mount by systemd or
    fstab), so that the answer is "permission denied" rather than "no mount"."""
    from imagefs import status

    own = status.socket_for(pidfile_for(mnt, resolved=True))
    system = Path("/run/imagefs") / own.name
    return own if own.exists() or not system.exists() else system


def cmd_status(args: argparse.Namespace) -> int:
    """``imagefs status``: the daemon's own report, from its status socket (see status.py)."""
    import json

    from imagefs import status

    mnt = _real_without_stat(args.mountpoint)
    sock = _status_socket(mnt)
    if not sock.exists() and os.path.islink(mnt):  # mounted through a symbolic link
        mnt = os.path.realpath(mnt)
        sock = _status_socket(mnt)
    try:
        r = status.query(sock)
    except status.StatusError as e:
        return _fail(f"{mnt}: {e}")
    print(json.dumps(r, indent=2) if args.json else status.format_text(r))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from imagefs import check

    cfg = _load(args.config)
    results = check.connect(cfg) if args.connect else None
    print(check.report(cfg, results))
    return EXIT_FAIL if results and not all(r.ok for r in results) else 0


def cmd_stores(args: argparse.Namespace) -> int:
    from imagefs import discovery

    return discovery.main(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from imagefs import demo

    try:
        return demo.main(args)
    except MountError as e:
        return _fail(str(e))


def cmd_replicate(args: argparse.Namespace) -> int:
    from imagefs import replicate

    return replicate.main(args)


def cmd_location(args: argparse.Namespace) -> int:
    """Print an image's location: by default ``user.imagefs.location`` (no secrets, anyone
    who may read the image); ``--glance`` the form glance_store can use, which for S3 holds
    the access key and secret, from ``trusted.imagefs.glance_location`` (root only)."""
    from imagefs.procfs import has_sys_admin
    from imagefs.xattrs import GLANCE_XATTR

    key = GLANCE_XATTR if args.glance else "user.imagefs.location"
    try:
        value = os.getxattr(args.image, key)
    except OSError as e:
        if e.errno != errno.ENODATA:
            return _fail(f"{args.image}: {e.strerror}")
        if args.glance and not has_sys_admin(os.getpid()):
            return _fail("--glance needs root (CAP_SYS_ADMIN): the Glance location can hold "
                         "credentials, so it is a trusted.* attribute")
        return _fail(f"{args.image}: no location glance_store can parse for this image (see "
                     "LOCATIONS in imagefs(8))")
    print(value.decode())
    return 0


def _add_mount_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="TOML configuration file")
    p.add_argument("mountpoint", help="directory to mount on")
    p.add_argument("-o", action="append", metavar="OPT[,OPT...]",
                   help="mount options: ro, allow_other, debug, degraded, log=PATH, fsname=NAME")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imagefs",
                                description="Mount VM image stores as directories.")
    p.add_argument("--version", action="version", version=f"imagefs {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("mount", help="mount the stores of a config on a directory",
                       description="Mount; returns once the mount is ready (daemonizes unless "
                                   "--foreground).")
    _add_mount_args(m)
    m.add_argument("-f", "--foreground", action="store_true",
                   help="stay in the foreground and log to stderr")
    m.set_defaults(func=cmd_mount)

    u = sub.add_parser("umount", help="unmount after in-flight uploads finish",
                       description="Wait until no file is open (uploads finish at close), "
                                   "then unmount and wait for the daemon to exit.")
    u.add_argument("mountpoint")
    u.add_argument("--timeout", type=float, default=600.0,
                   help="seconds to wait for open files (default 600)")
    u.set_defaults(func=cmd_umount)

    st = sub.add_parser("status", help="what a running mount is doing",
                        description="Per store: bytes read and written, backend calls, "
                                    "errors by errno, cache hits, open files, uploads in "
                                    "flight; the daemon's pid, uptime and memory. Asks the "
                                    "daemon (root, or the user who mounted).")
    st.add_argument("mountpoint")
    st.add_argument("--json", action="store_true", help="the report as JSON")
    st.set_defaults(func=cmd_status)

    cc = sub.add_parser("check-config", help="validate a config; --connect tries each store",
                        description="Validate CONFIG as mount does (exit 2 naming the file "
                                    "and key). With --connect, open every store and list one "
                                    "page: one line per store, ok or the reason; exit 1 if "
                                    "any store fails.")
    cc.add_argument("config", help="TOML configuration file")
    cc.add_argument("--connect", action="store_true",
                    help="open each store and list one page (no leftover clean-up)")
    cc.set_defaults(func=cmd_check_config)

    s = sub.add_parser("stores", help="list the configured stores",
                       description="One row per store: id, type, description, default, "
                                   "read-only, weight, usage.")
    s.add_argument("source", help="config file or mount point")
    s.add_argument("--json", action="store_true",
                   help="Glance GET /v2/info/stores/detail shape")
    s.add_argument("--no-usage", action="store_true", help="skip backend usage queries")
    s.set_defaults(func=cmd_stores)

    d = sub.add_parser("demo", help="mount the embedded demo config (two local file stores)",
                       description="Create DIR/stores/{fast,archive} with a sample image and "
                                   "mount them on DIR/mnt.")
    d.add_argument("dir", nargs="?", default="/var/lib/imagefs-demo")
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("copy", help="replicate an image to other stores of its mount",
                       description="Read MOUNTPOINT/STORE/IMAGE once and write it to every "
                                   "named store concurrently, verifying each copy's hash. "
                                   "Exit 0 all copied, 1 failed (copies removed), 2 usage, "
                                   "4 partial (--allow-partial).")
    c.add_argument("source", help="MOUNTPOINT/STORE/IMAGE")
    dest = c.add_mutually_exclusive_group(required=True)
    dest.add_argument("--to", metavar="STORE[,STORE...]")
    dest.add_argument("--all-stores", action="store_true",
                      help="every writable store but the source's")
    c.add_argument("--allow-partial", action="store_true",
                   help="keep the copies that succeeded when another fails")
    c.add_argument("--replace", action="store_true",
                   help="overwrite an image of that name whose content differs (default: "
                        "refuse; an identical one, by size and md5, is always left alone)")
    c.set_defaults(func=cmd_replicate)

    h = sub.add_parser("hash", help="compute and store an image's Glance hashes",
                       description="Read the image and store os_hash_algo, os_hash_value and "
                                   "checksum (md5) with it in its backend, in one update, "
                                   "unless the image changed while it was read (exit 1).")
    h.add_argument("image", help="MOUNTPOINT/STORE/IMAGE")
    h.add_argument("--algo", choices=hashing.ALGOS,
                   help="default: the mount's [hash] algo, the one it uses for what it writes")
    h.set_defaults(func=cmd_replicate)

    loc = sub.add_parser("location", help="print an image's location URL",
                         description="Print the image's location as Glance records it, "
                                     "without credentials; exit 1 if Glance has no form for "
                                     "it. --glance prints the form glance_store can read "
                                     "from (S3: with access key and secret; root only).")
    loc.add_argument("image", help="MOUNTPOINT/STORE/IMAGE")
    loc.add_argument("--glance", action="store_true",
                     help="the location glance_store uses, credentials included (root only)")
    loc.set_defaults(func=cmd_location)

    v = sub.add_parser("verify", help="read an image and compare with its stored hash",
                       description="Exit 0 match, 1 mismatch or read error, 3 no stored hash.")
    v.add_argument("image", help="MOUNTPOINT/STORE/IMAGE")
    v.set_defaults(func=cmd_replicate)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # `imagefs CONFIG MOUNTPOINT -o ...` is how mount.fuse3 calls the helper of fuse.imagefs.
    if len(argv) >= 2 and not argv[0].startswith("-") and argv[0] not in parser_commands() \
            and os.path.isfile(argv[0]):
        return mount_helper(argv)
    args = parser().parse_args(argv)
    return int(args.func(args) or 0)


def parser_commands() -> set[str]:
    return {"mount", "umount", "status", "check-config", "stores", "demo", "copy", "hash",
            "verify", "location"}


def mount_helper(argv: list[str] | None = None) -> int:
    """``mount.imagefs CONFIG MOUNTPOINT [-o OPTIONS]``, as mount(8) calls it from fstab."""
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="mount.imagefs", description="fstab helper for imagefs")
    p.add_argument("--version", action="version", version=f"imagefs {_version()}")
    _add_mount_args(p)
    p.add_argument("-n", action="store_true", help="ignored (mount(8) compatibility)")
    p.add_argument("-s", action="store_true", help="ignored (mount(8) compatibility)")
    p.add_argument("-v", action="store_true", help="ignored (mount(8) compatibility)")
    args = p.parse_args(argv)
    args.foreground = False
    return cmd_mount(args)


if __name__ == "__main__":
    raise SystemExit(main())
