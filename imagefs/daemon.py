"""The mount daemon: open stores, mount, serve, and unmount in order.

``mount`` returns only once the file system answers (or failed, with the reason), so scripts
and systemd can rely on it: the daemonized child reports readiness through a pipe and to
systemd with ``READY=1``. On SIGTERM/SIGINT or an external ``fusermount3 -u``, writes still open
are discarded (never published half-done), background work is cancelled and stores are closed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import hashlib
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from imagefs import kernel, procfs, stats, status
from imagefs import stores as registry
from imagefs.cache import BlockCache, DiskCache, MemoryCache
from imagefs.config import Config
from imagefs.filesystem import FsSettings
from imagefs.fs import ImageFS
from imagefs.reader import BlockSource
from imagefs.stores.base import Store
from imagefs.upload_queue import Budget
from imagefs.writer import WriterSettings

log = logging.getLogger("imagefs")

#: Options mount(8) and fstab pass along that mean nothing to a FUSE daemon.
IGNORED_OPTIONS = {"defaults", "auto", "noauto", "nofail", "_netdev", "user", "users", "nouser",
                   "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime",
                   "relatime", "strictatime", "rw", "async", "sync"}


#: The ``-o`` options imagefs itself takes, as imagefs(8) lists them.
OPTION_FORMS = ("ro", "allow_other", "debug", "degraded", "log=PATH", "fsname=NAME")


class MountError(Exception):
    """Why the mount could not be made, for the person who asked."""


@dataclass
class MountOptions:
    read_only: bool = False
    allow_other: bool = field(default_factory=lambda: os.geteuid() == 0)
    debug: bool = False
    degraded: bool = False
    log_file: str | None = None
    fsname: str = "imagefs"

    @classmethod
    def parse(cls, opts: list[str]) -> MountOptions:
        """'-o' values (comma-separated, repeatable). Raises ValueError naming the bad one."""
        o = cls()
        for group in opts:
            for item in filter(None, group.split(",")):
                key, _, value = item.partition("=")
                if key in IGNORED_OPTIONS or key.startswith("x-") or key.startswith("comment="):
                    continue
                if key == "ro":
                    o.read_only = True
                elif key == "allow_other":
                    o.allow_other = True
                elif key == "debug":
                    o.debug = True
                elif key == "degraded":
                    o.degraded = True
                elif key == "log" and value:
                    o.log_file = value
                elif key == "fsname" and value:
                    o.fsname = value
                else:
                    raise ValueError(f"unknown mount option {item!r} (known: "
                                     + ", ".join(OPTION_FORMS) + ")")
        return o


def runtime_dir() -> Path:
    return Path("/run/imagefs") if os.geteuid() == 0 else \
        Path(os.environ.get("XDG_RUNTIME_DIR", f"/tmp/imagefs-{os.getuid()}")) / "imagefs"


def pidfile_for(mountpoint: str, resolved: bool = False) -> Path:
    """``resolved``: ``mountpoint`` is already a real path; realpath() would stat the mount
    root, a FUSE request that a stuck daemon never answers (``imagefs status`` must not hang)."""
    path = mountpoint if resolved else os.path.realpath(mountpoint)
    digest = hashlib.sha1(path.encode()).hexdigest()[:16]
    return runtime_dir() / f"{digest}.pid"


def _sd_notify(message: str) -> None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(message.encode())


def _stderr_is_journal() -> bool:
    """systemd sets JOURNAL_STREAM=DEVICE:INODE when it connects stderr to the journal."""
    try:
        dev, ino = (int(x) for x in os.environ.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(2)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def _setup_logging(opts: MountOptions, foreground: bool, level_name: str = "info") -> None:
    """``-o debug`` wins over ``[mount] log_level``."""
    level = logging.DEBUG if opts.debug else getattr(logging, level_name.upper())
    handlers: list[logging.Handler] = []
    if opts.log_file:
        Path(opts.log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(opts.log_file))
    if foreground or not handlers:
        handlers.append(logging.StreamHandler(sys.stderr))
    # The journal stamps every line itself: a second timestamp would only be noise there.
    stamp = "" if foreground and not opts.log_file and _stderr_is_journal() else "%(asctime)s "
    logging.basicConfig(level=level, handlers=handlers, force=True,
                        format=stamp + "%(levelname)s %(name)s: %(message)s")
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "swiftclient"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def open_stores(config: Config, degraded: bool) -> list[Store]:
    """Build and connect every store in parallel; fail the mount on any failure unless degraded."""
    stores = [registry.build(s) for s in config.stores]

    def open_one(store: Store) -> None:
        store.open()
        try:
            n = store.cleanup_leftovers()
        except Exception as e:
            # Leftovers are hidden and harmless; credentials that may not list or abort
            # uploads, or one undeletable leftover, must not keep the images unreachable.
            log.warning("store %s: leftovers of a crash not cleaned (%s); the next mount "
                        "tries again", store.id, e)
            return
        if n:
            log.info("store %s: removed %d upload(s) left by a crash", store.id, n)

    failures = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(stores))) as pool:
        futures = {pool.submit(open_one, s): s for s in stores}
        for fut, store in futures.items():
            try:
                fut.result(timeout=store.timeout + 5)
            except Exception as e:
                failures.append(f"store {store.id} ({store.type_name}): {e}")
    if failures:
        for f in failures:
            log.error("%s", f)
        if not degraded:
            for s in stores:
                with contextlib.suppress(Exception):
                    s.close()
            raise MountError("cannot open " + "; ".join(failures) +
                             " (mount with -o degraded to mount the other stores anyway)")
    return stores


def _mount_dir(config: Config, mountpoint: str) -> Path:
    digest = hashlib.sha1(os.path.realpath(mountpoint).encode()).hexdigest()[:12]
    return config.cache.dir / digest


def build_fs(config: Config, stores: list[Store], mountpoint: str, opts: MountOptions) -> ImageFS:
    cc = config.cache
    mount_dir = _mount_dir(config, mountpoint)
    try:
        disk = (DiskCache(mount_dir / "blocks", cc.disk_size, block_size=cc.block_size)
                if cc.disk_size > 0 else None)
        spool = mount_dir / "spool"
        spool.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise MountError(f"cache directory {mount_dir}: {e.strerror or e}") from None
    for leftover in spool.iterdir():
        leftover.unlink(missing_ok=True)
    # Stores buffer large upload parts in temporary files: keep them in the cache, not /tmp.
    tempfile.tempdir = str(spool)
    # Blocks queued for the disk cache are memory too: at most half the memory cache's size.
    cache = BlockCache(MemoryCache(cc.memory_size), disk,
                       write_queue=min(64 << 20, cc.memory_size // 2))

    def source(nursery: trio.Nursery) -> BlockSource:
        return BlockSource(cache, cc.block_size, cc.max_prefetch_memory, nursery,
                           fetch_size=cc.fetch_size)

    settings = FsSettings(
        ttl=config.metadata_ttl, readahead=cc.readahead,
        writer=WriterSettings(spool_dir=spool, hash_algo=config.hash.algo,
                              spool_trim_after=config.cache.spool_trim_after,
                              write_budget=Budget(config.cache.max_write_behind),
                              hash_inline_max=config.hash.inline_max,
                              hash_background_max=config.hash.background_max),
        uid=os.getuid(), gid=os.getgid(), read_only=opts.read_only, mountpoint=mountpoint,
        page_cache=cc.page_cache,
    )
    return ImageFS(stores, source, settings)


async def _tune(mountpoint: str, readahead_kib: int) -> None:
    try:
        await trio.to_thread.run_sync(kernel.tune_connection, mountpoint, readahead_kib)
    except OSError as e:
        log.info("kernel settings of the mount not changed: %s", e)


async def _serve(fs: ImageFS, mountpoint: str, readahead_kib: int,
                 stop_timeout: float = 30.0) -> None:
    import pyfuse3

    async with trio.open_nursery() as nursery:
        fs.bind(nursery)
        serving = trio.CancelScope()

        async def on_signals() -> None:
            """First signal: stop taking requests, give those in flight ``stop_timeout``
            seconds, then abort them (a publish cut short publishes nothing; its leftovers
            are cleaned at the next mount). A second signal aborts at once."""
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                async for sig in sigs:
                    name = signal.Signals(sig).name
                    if serving.deadline == math.inf:
                        log.info("signal %s: unmounting; requests in flight get %gs to finish",
                                 name, stop_timeout)
                        _sd_notify(f"STOPPING=1\nSTATUS=stopping on {name}: "
                                   f"{status.uploads_in_flight(fs)} upload(s) in flight get "
                                   f"{stop_timeout:g}s")
                        serving.deadline = trio.current_time() + stop_timeout
                        pyfuse3.terminate()
                    else:
                        log.warning("signal %s again: aborting requests in flight now", name)
                        serving.cancel()

        nursery.start_soon(on_signals)
        # stat() of the mount point is answered by this very loop: do it from a thread.
        nursery.start_soon(_tune, mountpoint, readahead_kib)
        with serving:
            await pyfuse3.main(min_tasks=4, max_tasks=64)
        if serving.cancelled_caught:
            log.warning("requests still in flight were aborted; nothing partial was published")
        _sd_notify("STOPPING=1\nSTATUS=unmounting: discarding unpublished writes")
        with trio.move_on_after(max(stop_timeout, 1.0)) as draining:
            await fs.drain()
        if draining.cancelled_caught:
            log.warning("unfinished uploads could not all be aborted in time; the next mount "
                        "cleans what they left")
        if fs.source is not None:  # blocks read just before unmount are there at remount
            await trio.to_thread.run_sync(fs.source.cache.close, min(stop_timeout, 10.0))
        nursery.cancel_scope.cancel()


_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8


def _bound_allocator() -> None:
    """Make the C allocator give cache blocks back when they are freed, without paying a page
    fault for every byte the backends deliver.

    Blocks are 1 MiB bytes objects made in one thread and freed in another. glibc serves them
    from per-thread heaps once its adaptive mmap threshold has grown past 1 MiB, and keeps
    what they freed: resident memory reached twice the configured bounds (414 MiB peak copying
    1 GiB in and out with a 128 MiB cache). A fixed mmap threshold of 256 KiB fixed that (220
    MiB) but maps and unmaps every buffer, and each fresh page then faults: librbd reads ran
    at half speed in the same process (measured here), imagefs's RBD cold reads at 224-366 MB/s.
    So: a threshold of 2 MiB (1 MiB blocks come from the heaps and are reused; big transient
    buffers are still mapped and given back), two heaps, and smaller default cache bounds
    (64 MiB memory, 64 MiB prefetch): peak 217 MiB on the same copy, RBD cold reads 456-585
    MB/s.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 2 << 20)
        libc.mallopt(_M_ARENA_MAX, 2)
    except (OSError, AttributeError) as e:  # not glibc: its defaults stay
        log.debug("mallopt unavailable: %s", e)


def _start_reporting(config: Config, fs: ImageFS, mountpoint: str, pidfile: Path
                     ) -> tuple[status.StatusServer, Any]:
    """The status socket (always) and the Prometheus endpoint (``[mount] metrics``), both
    answered from their own threads by the same report."""
    def make_report() -> status.Report:
        return status.report(fs, mountpoint, str(config.path))

    try:
        status_server = status.StatusServer(status.socket_for(pidfile), make_report)
    except OSError as e:
        raise MountError(f"status socket {status.socket_for(pidfile)}: {e.strerror or e}"
                         ) from None
    if config.metrics is None:
        return status_server, None
    from imagefs import metrics

    host, port = config.metrics
    try:
        server = metrics.start(host, port, make_report)
    except OSError as e:
        status_server.close()
        raise MountError(f"metrics address {host}:{port} ([mount] metrics): "
                         f"{e.strerror or e}") from None
    log.info("metrics on http://%s:%d/metrics", host if ":" not in host else f"[{host}]", port)
    return status_server, server


def _stop_reporting(status_server: status.StatusServer, metrics_server: Any) -> None:
    status_server.close()
    if metrics_server is not None:
        metrics_server.shutdown()
        metrics_server.server_close()


def serve(config: Config, mountpoint: str, opts: MountOptions, foreground: bool,
          ready_fd: int | None = None) -> int:
    """Mount and serve until unmounted. Reports readiness/failure on ``ready_fd``."""
    import pyfuse3

    _bound_allocator()

    def report(msg: str) -> None:
        if ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(ready_fd, msg.encode())
                os.close(ready_fd)

    _setup_logging(opts, foreground, config.log_level)
    pidfile = pidfile_for(mountpoint)  # realpath() stats the mount point: only before mounting
    try:
        stores = open_stores(config, opts.degraded)
        stats.reset([s.id for s in stores])
        fs = build_fs(config, stores, mountpoint, opts)
        status_server, metrics_server = _start_reporting(config, fs, mountpoint, pidfile)
        fuse_opts = set(pyfuse3.default_options)
        fuse_opts |= {f"fsname={opts.fsname}:{config.path}", "subtype=imagefs",
                      "default_permissions"}
        if opts.allow_other:
            fuse_opts.add("allow_other")
        if opts.debug:
            fuse_opts.add("debug")
        try:
            pyfuse3.init(fs, mountpoint, fuse_opts)
        except RuntimeError as e:
            _stop_reporting(status_server, metrics_server)
            raise MountError(f"cannot mount on {mountpoint}: {e}") from None
    except MountError as e:
        log.error("%s", e)
        report(f"error: {e}")
        return 1
    with contextlib.suppress(OSError):
        pidfile.parent.mkdir(parents=True, exist_ok=True)
        pidfile.write_text(f"{os.getpid()}\n")
    log.info("mounted %s on %s: stores %s", config.path, mountpoint,
             ", ".join(f"{s.id} ({s.type_name})" for s in stores))
    report("ok")
    _sd_notify(f"READY=1\nSTATUS=serving {len(stores)} store(s) on {mountpoint}")
    try:
        trio.run(_serve, fs, mountpoint, max(1024, config.cache.readahead // 1024),
                 config.stop_timeout)
    finally:
        with contextlib.suppress(Exception):
            pyfuse3.close(unmount=True)
        _stop_reporting(status_server, metrics_server)
        for s in stores:
            with contextlib.suppress(Exception):
                s.close()
        with contextlib.suppress(OSError):
            pidfile.unlink()
        log.info("unmounted %s", mountpoint)
    return 0


def _clear_dead_mount(mountpoint: str) -> None:
    """A daemon that died leaves 'Transport endpoint is not connected': lazily unmount it so a
    restart (systemd Restart=on-failure) can mount again."""
    if _is_imagefs_mount(mountpoint) and not _daemon_alive(pidfile_for(mountpoint)):
        log.warning("%s: clearing a dead imagefs mount", mountpoint)
        subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True)


def _is_imagefs_mount(mountpoint: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[4] == mountpoint and fields[sep + 1] == "fuse.imagefs":
                return True
    return False


def _daemon_alive(pidfile: Path) -> bool:
    try:
        pid = int(pidfile.read_text())
    except (OSError, ValueError):
        return False
    return procfs.running(pid)


def mount(config: Config, mountpoint: str, opts: MountOptions, foreground: bool) -> int:
    """``imagefs mount``: serve in the foreground, or fork and return once the mount is ready."""
    _clear_dead_mount(mountpoint)
    if not os.path.isdir(mountpoint):
        raise MountError(f"mount point {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise MountError(f"{mountpoint} is already a mount point")
    if foreground:
        return serve(config, mountpoint, opts, foreground=True)
    if opts.log_file is None:
        opts.log_file = str(config.cache.dir / "imagefs.log")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        code = 1
        try:
            code = serve(config, mountpoint, opts, foreground=False, ready_fd=w)
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        msg = f.read().decode(errors="replace")
    if msg == "ok":
        return 0
    if not msg:
        msg = f"the mount daemon exited before the mount was ready; see {opts.log_file}"
    raise MountError(msg.removeprefix("error: "))
