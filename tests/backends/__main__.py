"""Run the test backends by hand.

    python -m tests.backends up   [--only ceph,ceph2,swift,nginx,cinder] [--dir DIR] [--detach]
                                  [--bluestore]
    python -m tests.backends env  [--dir DIR]     # shell `export` lines for the running set
    python -m tests.backends down [--dir DIR]     # stop a detached set

``up`` stays in the foreground until Ctrl-C or SIGTERM, then stops everything; it records
the set in ``DIR/state.json`` for ``env`` and ``down``. ``--detach`` runs that same ``up`` in
the background and returns once the set is up; ``down`` stops it. A backend that runs on
another (cinder on ceph) brings it along: ``--only cinder`` starts ceph too.
``eval "$(python -m tests.backends env)"`` also sets ``IMAGEFS_USE_BACKENDS``, which makes
pytest's fixtures use this set instead of starting their own. The default DIR is
``$IMAGEFS_BACKENDS_DIR`` or /tmp/imagefs-backends.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.backends import (
    NAMES,
    STATE_FILE,
    common,
    make,
    needs,
    read_state,
    start_many,
    stop_order,
    with_needs,
    write_state,
)
from tests.backends.common import log

DEFAULT_DIR = os.environ.get("IMAGEFS_BACKENDS_DIR") or "/tmp/imagefs-backends"


def _running(root: Path) -> bool:
    """True if *root* holds a set whose supervising ``up`` process still runs."""
    try:
        return common.owner_alive(read_state(root)["owner"])
    except (OSError, ValueError, KeyError):
        return False


def _raise_interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def cmd_up(args: argparse.Namespace) -> int:
    root = Path(args.dir).resolve()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(names) - set(NAMES)
    if unknown:
        sys.exit(f"unknown backend(s) {', '.join(sorted(unknown))}; known: {', '.join(NAMES)}")
    extra = sorted(with_needs(set(names)) - set(names))
    if extra:
        log(f"also starting {', '.join(extra)}: {', '.join(sorted(names))} run(s) on it")
        names += extra
        args.only = ",".join(names)  # what a detached supervisor is told to start
    if _running(root):
        sys.exit(
            f"a set is already running in {root}: `python -m tests.backends down "
            f"--dir {root}` first"
        )
    if (root / STATE_FILE).exists():  # its `up` was killed: stop what it left
        _tear_down(root)
    common.reap_orphans()
    root.mkdir(parents=True, exist_ok=True)
    if args.detach:
        return _detach(root, args)
    common.install_cleanup_hooks()
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)

    store = "bluestore" if args.bluestore else None
    backends = [make(n, root, objectstore=store) for n in NAMES if n in names]
    try:
        errors = start_many(backends)
        for name, err in errors.items():
            log(f"{name} failed:\n{err}")
        if errors:
            return 1
        write_state(root, backends, common.owner_tag())
        print_env(root)
        log(f"running; Ctrl-C, SIGTERM or `python -m tests.backends down --dir {root}` stops them")
        while True:
            time.sleep(1)
            for b in backends:
                b.check()  # a dead daemon ends the set rather than leaving it half-working
    except KeyboardInterrupt:
        return 0
    except common.BackendError as e:
        log(str(e))
        return 1
    finally:
        for group in stop_order(backends):
            with ThreadPoolExecutor(max_workers=len(group)) as pool:
                list(pool.map(lambda b: b.stop(), group))
        (root / STATE_FILE).unlink(missing_ok=True)
        for b in backends:
            common.remove_tree(b.dir)
        try:
            root.rmdir()
        except OSError:
            pass  # not empty: not only ours
        log("stopped")


def _detach(root: Path, args: argparse.Namespace) -> int:
    """Run ``up`` (without --detach) in the background as the set's supervisor, and return
    once it has written the state file.

    The supervisor stays the daemons' parent: it stops them in order on ``down`` (SIGTERM)
    and reaps them, where orphaned daemons would need an init that reaps (not every sandbox's
    PID 1 does).
    """
    argv = [sys.executable, "-m", "tests.backends", "up", "--dir", str(root), "--only", args.only]
    if args.bluestore:
        argv.append("--bluestore")
    project = str(Path(__file__).resolve().parents[2])
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(p for p in (project, os.environ.get("PYTHONPATH")) if p),
    )
    logfile = root / "supervisor.log"
    with open(logfile, "ab") as out:
        sup = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=env,
            cwd=project,
            start_new_session=True,
        )
    while not _running(root):
        if sup.poll() is not None:
            sys.stderr.write(common.tail(logfile, 60) + "\n")
            log(f"supervisor exited with status {sup.returncode}")
            return 1
        time.sleep(0.05)
    progress = [ln for ln in common.tail(logfile, 40).splitlines() if ln.startswith("[backends]")]
    sys.stderr.write("".join(ln + "\n" for ln in progress))
    print_env(root)
    log(
        f"detached (supervisor pid {sup.pid}); stop with: "
        f"python -m tests.backends down --dir {root}"
    )
    return 0


def print_env(root: Path) -> None:
    """Print ``export`` lines for every running backend of *root* (and for pytest reuse)."""
    state = read_state(root)
    env: dict[str, str] = {"IMAGEFS_USE_BACKENDS": str(root)}
    for entry in state["backends"].values():
        env.update(entry["env"])
    for key, value in env.items():
        print(f"export {key}={shlex.quote(value)}")
    sys.stdout.flush()


def cmd_env(args: argparse.Namespace) -> int:
    root = Path(args.dir).resolve()
    if not _running(root):
        sys.exit(f"no running set in {root} (start one with: python -m tests.backends up)")
    print_env(root)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    root = Path(args.dir).resolve()
    if not (root / STATE_FILE).exists():
        sys.exit(f"no state file {root / STATE_FILE}: nothing to stop")
    _tear_down(root)
    return 0


def _tear_down(root: Path) -> None:
    """Ask the supervisor to stop its set; if it is gone, stop what it left ourselves."""
    state = read_state(root)
    tag = state["owner"]
    if common.owner_alive(tag):
        pid = int(tag.split(":")[0])
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while common.pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    entries = sorted(state["backends"].items(), key=lambda e: not needs(e[0]))
    for name, entry in entries:  # those that run on others first (they use them on the way out)
        directory = Path(entry["dir"])
        pids = list(reversed(entry["pids"]))
        if entry.get("ordered_stop", True):  # e.g. radosgw, then OSD, then mon
            for pid in pids:
                common.stop_pids([pid], tag, directory)
        else:
            common.stop_pids(pids, tag, directory)
        for m in reversed(entry["mounts"]):
            common.unmount(Path(m))
        common.remove_tree(directory)
        log(f"{name} stopped")
    (root / STATE_FILE).unlink(missing_ok=True)
    (root / "supervisor.log").unlink(missing_ok=True)
    try:
        root.rmdir()
    except OSError:
        pass  # not empty: not only ours


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.backends",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start backends")
    up.add_argument(
        "--only", default=",".join(NAMES), help="comma-separated subset of " + ",".join(NAMES)
    )
    up.add_argument("--detach", action="store_true", help="leave them running and return")
    up.add_argument(
        "--bluestore",
        action="store_true",
        help="Ceph OSDs on bluestore (sparse file) instead of memstore (RAM)",
    )
    for p in (
        up,
        sub.add_parser("env", help="print export lines"),
        sub.add_parser("down", help="stop a detached set"),
    ):
        p.add_argument("--dir", default=DEFAULT_DIR, help=f"state directory ({DEFAULT_DIR})")
    args = parser.parse_args(argv)
    return {"up": cmd_up, "env": cmd_env, "down": cmd_down}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
