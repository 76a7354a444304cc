"""Process, port, wait and clean-up helpers shared by the backend modules.

Every daemon a backend runs is a direct child started here, in its own session (so a whole
process group can be signalled) and tagged with ``IMAGEFS_BACKEND_OWNER`` in its environment.
The tag names the process that owns it (PID and start time): a later run can then find and
kill daemons whose owner died without cleaning up (SIGKILL, OOM, CI timeout) without touching
a live run or a developer's hand-started set, and ``down`` can check that a PID read from a
state file is still the daemon that was started.

Everything started is also recorded in a module-level registry, which an ``atexit`` hook and
the SIGTERM/SIGHUP handlers empty, so an interrupted run leaves no process and no mount behind.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
OWNER_ENV = "IMAGEFS_BACKEND_OWNER"
SCRATCH_PREFIX = "imagefs-backends-"


class BackendError(RuntimeError):
    """A backend could not be started or one of its daemons died; the text carries log tails."""


class BackendMissing(BackendError):
    """Software a backend needs is not installed; the text names the Debian packages."""


def log(msg: str) -> None:
    """Progress lines go to stderr: pytest shows them with ``-s`` or on failure, the CLI always."""
    print(f"[backends] {msg}", file=sys.stderr, flush=True)


# --- identity -------------------------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    """Kernel start time of *pid*: together with the PID it names one process, never a reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


_owner_tag = f"{os.getpid()}:{_start_time(os.getpid())}"


def owner_tag() -> str:
    """The ``IMAGEFS_BACKEND_OWNER`` value (``PID:STARTTIME`` of this process) of our daemons."""
    return _owner_tag


def owner_alive(tag: str) -> bool:
    """True while the process named by an owner tag still runs."""
    pid, _, started = tag.partition(":")
    return pid.isdigit() and _start_time(int(pid)) == started and pid_alive(int(pid))


def proc_tag(pid: int) -> str | None:
    """The owner tag in *pid*'s environment (None: gone, not ours, or unreadable)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    key = OWNER_ENV.encode() + b"="
    for item in env.split(b"\0"):
        if item.startswith(key):
            return item[len(key) :].decode(errors="replace")
    return None


def owns(pid: int, tag: str | None, directory: Path) -> bool:
    """True if *pid* is a daemon of the set tagged *tag* (any tag if None) in *directory*.

    The environment tag is the proof, except for nginx, which overwrites its environment
    with its process title; its command line names its directory instead.
    """
    if tag is not None and proc_tag(pid) == tag:
        return True
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return pid_alive(pid) and f" {directory}/".encode() in cmdline


def pid_alive(pid: int) -> bool:
    """True while *pid* runs; a zombie (exited, not yet reaped by whoever adopted it) is dead."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


# --- ports ----------------------------------------------------------------------------------

_ports_lock = threading.Lock()
_ports_given: set[int] = set()


def free_ports(count: int) -> list[int]:
    """*count* distinct TCP ports on 127.0.0.1 that nobody listens on right now.

    The kernel picks them (bind to port 0); all sockets stay open until every port is chosen so
    one call never returns a port twice, and ports handed out before in this process are
    skipped so backends starting in parallel threads never get the same one.
    """
    with _ports_lock:
        socks: list[socket.socket] = []
        ports: list[int] = []
        try:
            while len(ports) < count:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind((HOST, 0))
                port = s.getsockname()[1]
                if port not in _ports_given:
                    ports.append(port)
                    _ports_given.add(port)
        finally:
            for s in socks:
                s.close()
        return ports


# --- commands and daemons -------------------------------------------------------------------


def require(binaries: Iterable[str], packages: str) -> None:
    """Fail with an install hint, not a FileNotFoundError deep inside a start-up."""
    missing = [b for b in binaries if shutil.which(b) is None and not os.path.exists(b)]
    if missing:
        raise BackendMissing(
            f"missing {', '.join(missing)}: install with `apt-get install {packages}`"
        )


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for children: ours plus the owner tag (and *extra*)."""
    env = dict(os.environ)
    env[OWNER_ENV] = _owner_tag
    env.update(extra or {})
    return env


def run(argv: Sequence[str | os.PathLike[str]], timeout: float = 60, **kw: Any) -> str:
    """Run a set-up command to completion; its output is in the error if it fails."""
    env = kw.pop("env", None) or child_env()
    try:
        res = subprocess.run(
            [str(a) for a in argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            env=env,
            check=False,
            **kw,
        )
    except subprocess.TimeoutExpired as e:
        raise BackendError(f"{' '.join(map(str, argv))}: timed out after {timeout}s") from e
    out = res.stdout.decode(errors="replace")
    if res.returncode != 0:
        raise BackendError(f"{' '.join(map(str, argv))}: exit {res.returncode}\n{out}")
    return out


class Daemon:
    """One long-running child in its own session, output appended to a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str | os.PathLike[str]],
        logfile: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.logfile = logfile
        #: How it was started, so a fault test can start it again (Backend.restart).
        self.argv, self.env, self.cwd = list(argv), env, cwd
        with _registry_lock:
            if _closing:
                raise BackendError(f"not starting {name}: shutting down")
            with open(logfile, "ab") as out:
                # start_new_session: its own process group, so stop() reaches any children too
                # and a Ctrl-C in the developer's terminal does not hit it before we stop it.
                self.proc = subprocess.Popen(
                    [str(a) for a in argv],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=child_env(env),
                    cwd=cwd,
                    start_new_session=True,
                )
            _daemons.append(self)
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def exit_text(self) -> str:
        return f"{self.name} (pid {self.pid}) exited with status {self.proc.returncode}"

    def signal(self, sig: int) -> None:
        """Signal the whole process group (the daemon and anything it forked)."""
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def wait(self, timeout: float) -> bool:
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False


def stop_daemons(daemons: Sequence[Daemon], timeout: float = 10.0) -> None:
    """SIGTERM all of *daemons* at once, wait, SIGKILL what is left; then forget them."""
    for d in daemons:
        if d.alive():
            d.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for d in daemons:
        if not d.wait(max(0.0, deadline - time.monotonic())):
            log(f"{d.name} (pid {d.pid}) ignored SIGTERM for {timeout}s: SIGKILL")
            d.signal(signal.SIGKILL)
            d.wait(5)
        d.signal(signal.SIGKILL)  # stragglers in its group (e.g. forked workers)
    with _registry_lock:
        for d in daemons:
            if d in _daemons:
                _daemons.remove(d)


def stop_pids(pids: Sequence[int], tag: str, directory: Path, timeout: float = 10.0) -> None:
    """Like :func:`stop_daemons` for processes that are not our children (a set left behind).

    Only PIDs that :func:`owns` confirms are signalled, so a PID reused by an unrelated
    process since the set was started is left alone.
    """
    ours = [p for p in pids if owns(p, tag, directory)]
    for p in ours:
        _killpg(p, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(pid_alive(p) for p in ours) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in ours:
        if pid_alive(p):
            _killpg(p, signal.SIGKILL)


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def wait_until(
    cond: Callable[[], bool],
    what: str,
    daemons: Sequence[Daemon] = (),
    timeout: float = 30.0,
    interval: float = 0.05,
) -> None:
    """Poll *cond* until true; fail at once if one of *daemons* exits instead of timing out."""
    deadline = time.monotonic() + timeout
    while True:
        for d in daemons:
            if not d.alive():
                raise BackendError(f"{d.exit_text()} while waiting for {what}")
        if cond():
            return
        if time.monotonic() > deadline:
            raise BackendError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """HTTP status of a GET, or None when nothing answers (yet)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


def tail(path: Path, lines: int = 30) -> str:
    """Last *lines* lines of a text file (empty when missing)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 200 * lines))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def tail_logs(logdir: Path, lines: int = 30) -> str:
    """Tails of every non-empty log in *logdir*, each under a header naming the file."""
    parts = []
    for p in sorted(logdir.glob("*")) if logdir.is_dir() else []:
        text = tail(p, lines)
        if text.strip():
            parts.append(f"----- {p} (last {lines} lines) -----\n{text}")
    return "\n".join(parts) or f"(no logs in {logdir})"


# --- mounts and scratch dirs ----------------------------------------------------------------


def mounted(path: Path) -> bool:
    """True if *path* is a mount point (per /proc/mounts, which never blocks on a dead FUSE)."""
    target = str(path)
    with open("/proc/mounts") as f:
        return any(line.split()[1].replace("\\040", " ") == target for line in f if line.strip())


def mount_tmpfs(path: Path, size: str) -> None:
    """Mount a tmpfs at *path* and record it, so clean-up unmounts it whatever happens."""
    with _registry_lock:
        if _closing:
            raise BackendError("not mounting: shutting down")
        run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "imagefs-test", path])
        _mounts.append(path)


def register_mount(path: Path) -> None:
    """Record a mount made elsewhere (an imagefs test mount) so clean-up unmounts it too."""
    with _registry_lock:
        _mounts.append(path)


def unmount(path: Path) -> None:
    """Unmount (lazily if busy) and forget *path*."""
    if mounted(path):
        res = subprocess.run(["umount", str(path)], capture_output=True, check=False)
        if res.returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)
    with _registry_lock:
        if path in _mounts:
            _mounts.remove(path)


def make_scratch(base: Path | None = None) -> Path:
    """A fresh scratch directory, with an ``owner`` file for :func:`reap_orphans`."""
    path = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=base))
    (path / "owner").write_text(_owner_tag)
    with _registry_lock:
        _dirs.append(path)
    return path


def remove_tree(path: Path) -> None:
    """Remove a scratch tree after unmounting anything still mounted below it."""
    prefix = str(path).rstrip("/") + "/"
    with open("/proc/mounts") as f:
        below = [ln.split()[1] for ln in f if ln.split()[1].startswith(prefix)]
    for m in sorted(below, reverse=True):
        unmount(Path(m))
    shutil.rmtree(path, ignore_errors=True)
    with _registry_lock:
        if path in _dirs:
            _dirs.remove(path)


def reap_orphans() -> None:
    """Kill daemons and remove scratch dirs left by runs that died without cleaning up.

    Only processes whose owner (the run or ``up`` that started them) no longer exists are
    killed; other live runs and hand-started sets are never touched.
    """
    dead_dirs = []
    for d in Path(tempfile.gettempdir()).glob(SCRATCH_PREFIX + "*"):
        try:
            if not owner_alive((d / "owner").read_text().strip()):
                dead_dirs.append(d)
        except OSError:
            continue
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or not pid_alive(pid := int(entry.name)):
            continue
        tag = proc_tag(pid)
        orphan = tag is not None and not owner_alive(tag)
        orphan = orphan or any(owns(pid, None, d) for d in dead_dirs)
        if orphan:
            log(f"killing orphaned backend process {pid} (its run is gone)")
            _killpg(pid, signal.SIGKILL)
    for d in dead_dirs:
        log(f"removing orphaned scratch dir {d}")
        remove_tree(d)


# --- registry + last-resort clean-up ----------------------------------------------------------

_registry_lock = threading.RLock()  # re-entrant: a signal handler may run while it is held
_daemons: list[Daemon] = []
_mounts: list[Path] = []
_dirs: list[Path] = []
_closing = False


def cleanup(timeout: float = 3.0) -> None:
    """Stop every registered daemon (latest first), unmount, remove scratch dirs.

    The last line of defence (exit hook, SIGTERM): backends normally stop themselves in their
    own order first. Starting new daemons is refused from here on.
    """
    global _closing
    with _registry_lock:
        _closing = True
        daemons = list(reversed(_daemons))
    if daemons:
        log("stopping " + ", ".join(d.name for d in daemons))
    for d in daemons:  # one at a time, latest first: radosgw before OSD before mon
        stop_daemons([d], timeout)
    for m in reversed(list(_mounts)):
        unmount(m)
    for path in reversed(list(_dirs)):
        remove_tree(path)


def _on_signal(signum: int, _frame: Any) -> None:
    cleanup()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


_hooks_installed = False


def install_cleanup_hooks() -> None:
    """Clean up at interpreter exit and on SIGTERM/SIGHUP (which otherwise skip ``atexit``).

    SIGINT is left alone: it raises KeyboardInterrupt, and pytest or the CLI then stop the
    backends in order. Only the main thread may set signal handlers; elsewhere atexit only.
    """
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(cleanup)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, _on_signal)


# --- the shape every backend shares ---------------------------------------------------------


class Backend:
    """A set of daemons under one scratch directory, started and stopped as a unit.

    Subclasses implement :meth:`_start` (spawning with :meth:`spawn`, in dependency order),
    :attr:`info` (the object tests get) and :meth:`env` (shell settings for hand use). The
    default :meth:`stop` stops daemons latest-started first, one at a time.
    """

    name = "backend"
    packages = ""  # Debian packages to install, for skip messages
    ordered_stop = True  # stop daemons one at a time, latest first (else all at once)
    #: Other backends this one runs on (cinder on ceph): started first, stopped after it.
    needs: tuple[str, ...] = ()

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        #: Set by whoever starts it when ``needs`` is not empty: name -> that backend's info
        #: object, waiting for it to be up (see tests.backends.start_many, fixtures.py).
        self.resolve: Callable[[str], Any] | None = None
        self.logdir = directory / "log"
        self.daemons: list[Daemon] = []
        self.mounts: list[Path] = []
        self.startup_seconds: float | None = None

    @property
    def info(self) -> Any:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        raise NotImplementedError

    def _start(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        """Start everything or nothing: on failure stop what did start and raise with logs."""
        t0 = time.monotonic()
        self.logdir.mkdir(parents=True, exist_ok=True)
        try:
            self._start()
        except BaseException as e:
            logs = tail_logs(self.logdir)
            self.stop()
            if isinstance(e, BackendError):
                raise type(e)(f"{self.name}: {e}\n{logs}") from e
            if isinstance(e, Exception):
                raise BackendError(f"{self.name}: {type(e).__name__}: {e}\n{logs}") from e
            raise
        self.startup_seconds = time.monotonic() - t0
        log(f"{self.name} up in {self.startup_seconds:.1f}s ({self.dir})")

    def spawn(self, name: str, argv: Sequence[str | os.PathLike[str]], **kw: Any) -> Daemon:
        d = Daemon(name, argv, self.logdir / f"{name}.out", **kw)
        self.daemons.append(d)
        return d

    def stop(self) -> None:
        """Stop the daemons (see :attr:`ordered_stop`), then unmount what we mounted."""
        if self.ordered_stop:
            for d in reversed(self.daemons):
                stop_daemons([d])
        else:
            stop_daemons(list(reversed(self.daemons)))
        self.daemons.clear()
        self.unmount_all()

    def daemon(self, name: str) -> Daemon:
        """The running daemon called *name* (``osd.0``, ``rgw.gw``, ``proxy``, ``nginx``)."""
        for d in self.daemons:
            if d.name == name:
                return d
        raise KeyError(f"{self.name} has no daemon {name!r}: "
                       f"{', '.join(d.name for d in self.daemons)}")

    @contextmanager
    def frozen(self, name: str) -> Iterator[Daemon]:
        """SIGSTOP daemon *name* (its whole process group) for the block; SIGCONT whatever
        happens, so a fault test leaves the backend as it found it."""
        d = self.daemon(name)
        d.signal(signal.SIGSTOP)
        try:
            yield d
        finally:
            d.signal(signal.SIGCONT)

    def kill(self, name: str) -> None:
        """SIGKILL daemon *name* (and its group) and reap it: a crash, for fault tests."""
        d = self.daemon(name)
        d.signal(signal.SIGCONT)  # a stopped process dies only once it runs again
        d.signal(signal.SIGKILL)
        if not d.wait(30):
            raise BackendError(f"{self.name}: {d.name} (pid {d.pid}) survived SIGKILL")

    def restart(self, name: str, timeout: float = 60.0) -> Daemon:
        """Start daemon *name* again as it was started (after :meth:`kill`, or killing it
        now if it still runs) and wait until the backend serves again (:meth:`ready`)."""
        old = self.daemon(name)
        if old.alive():
            self.kill(name)
        with _registry_lock:
            if old in _daemons:
                _daemons.remove(old)
        new = Daemon(old.name, old.argv, old.logfile, env=old.env, cwd=old.cwd)
        self.daemons[self.daemons.index(old)] = new
        self.ready(name, timeout)
        log(f"{self.name}: {name} restarted (pid {new.pid})")
        return new

    def ready(self, name: str, timeout: float) -> None:
        """Wait until daemon *name*, just restarted, serves again; backends that can be
        restarted override it."""
        raise BackendError(f"{self.name}: no readiness check for restarting {name!r}")

    def unmount_all(self) -> None:
        for m in reversed(self.mounts):
            unmount(m)
        self.mounts.clear()

    def check(self) -> None:
        """Raise (with the log tail) if a daemon has died since start-up."""
        dead = [d for d in self.daemons if not d.alive()]
        if dead:
            texts = "; ".join(d.exit_text() for d in dead)
            raise BackendError(f"{self.name}: {texts}\n{tail_logs(self.logdir)}")

    def log_tail(self, lines: int = 30) -> str:
        return tail_logs(self.logdir, lines)

    def state(self) -> dict[str, Any]:
        """What ``down`` and ``env`` need after this process has gone (``up --detach``)."""
        return {
            "dir": str(self.dir),
            "pids": [d.pid for d in self.daemons],  # start order; stopped in reverse
            "ordered_stop": self.ordered_stop,
            "mounts": [str(m) for m in self.mounts],
            "env": self.env(),
            "info": info_to_dict(self.info),
        }


def info_to_dict(info: Any) -> dict[str, Any]:
    """A dataclass info object as JSON-able dict (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(info).items()}
