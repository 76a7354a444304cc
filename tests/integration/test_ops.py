"""Operations (issue 16): ``imagefs status``, the Prometheus endpoint, ``check-config
--connect``, systemd's notify protocol and unit file, and no secret in anything an operator or
another user can see. Real mounts on real backends; counters are compared with what the test
itself moved through the mount, never with timings."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_common import MiB, make_file, sh
from tests.mounting import IMAGEFS, Mount, daemon_pid, to_toml, tool, write_config

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str | Path, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*IMAGEFS, *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status(m: Mount) -> dict[str, Any]:
    r = run_cli("status", m.root, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint, parsed by prometheus_client's own parser."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        assert r.status == 200
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def held_writer(path: Path, size: int) -> subprocess.Popen[str]:
    """A process that writes ``size`` bytes to ``path`` and keeps it open until killed."""
    p = subprocess.Popen([sys.executable, "-c", (
        "import sys,time; f=open(sys.argv[1],'wb'); f.write(b'w'*int(sys.argv[2])); f.flush();"
        "print('ready',flush=True); time.sleep(600)"), str(path), str(size)],
        stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


# ---------------------------------------------------------------------------------- status
@pytest.mark.parametrize("kind", ["file", "s3"])
def test_status_and_metrics_count_a_copy(kind: str, request: pytest.FixtureRequest,
                                         mount_factory: Any, tmp_path: Path) -> None:
    """dd writes 4 MiB through the mount, cp reads it back twice: status and the metrics
    endpoint show those bytes, the backend calls, the ENOENT of a missing name, the open
    handle and pending bytes of a writer, and (s3: block cache) misses then memory hits."""
    table = request.getfixturevalue(f"{kind}_store_table")
    port = free_port()
    m = mount_factory({"st": table}, cache={"page_cache": False},
                      mount={"metrics": f"127.0.0.1:{port}"})
    before = status(m)
    # the socket is the mounting user's (root) only
    other = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            *IMAGEFS, "status", str(m.root)], capture_output=True, text=True,
                           timeout=60)
    assert other.returncode == 1 and "permission denied" in other.stderr, other.stderr
    assert before["pid"] == daemon_pid(m) and before["rss_bytes"] > 0
    assert before["mountpoint"] == str(m.root) and before["config"] == str(m.config)
    row = before["stores"]["st"]
    assert row["type"] == kind and row["read_bytes"] == row["written_bytes"] == 0
    src = tmp_path / "src.raw"
    make_file(src, 4 * MiB, "ops")
    sh("dd", f"if={src}", f"of={m.path('st', 'img.raw')}", "bs=1M", "status=none")
    assert not os.path.exists(m.path("st", "missing.raw"))
    sh("cp", m.path("st", "img.raw"), tmp_path / "back1.raw")
    sh("cmp", src, tmp_path / "back1.raw")
    mid = status(m)["stores"]["st"]
    assert mid["written_bytes"] == 4 * MiB
    assert mid["read_bytes"] == 4 * MiB
    assert mid["requests"] > row["requests"]
    assert mid["errors"].get("ENOENT", 0) >= 1
    sh("cp", m.path("st", "img.raw"), tmp_path / "back2.raw")
    after = status(m)["stores"]["st"]
    assert after["read_bytes"] == 8 * MiB
    mem, disk = after["cache"]["memory"], after["cache"]["disk"]
    if kind == "s3":  # 4 blocks of 1 MiB: each fetched from S3 once (the first read or the
        # prefetch that follows it), then served from memory: the second copy misses nothing
        assert mid["cache"]["memory"]["misses"] >= 1 and mid["cache"]["disk"]["misses"] >= 4
        assert (mem["misses"], disk["misses"]) == (mid["cache"]["memory"]["misses"],
                                                   mid["cache"]["disk"]["misses"]), after
        assert mem["hits"] >= mid["cache"]["memory"]["hits"] + 4, after
    else:  # file stores are read in place, not through the block cache
        assert mem == disk == {"hits": 0, "misses": 0}

    writer = held_writer(m.path("st", "pending.raw"), 3 * MiB)
    try:
        live = status(m)["stores"]["st"]
        assert live["open_handles"] == 1
        assert live["uploads"] == [{"image": "pending.raw", "bytes": 3 * MiB,
                                    "publishing": False}]
        text = run_cli("status", m.root)
        assert text.returncode == 0 and "st/pending.raw: 3.0 MiB so far" in text.stdout
        samples = scrape(port)
        st = (("store", "st"),)
        assert samples[("imagefs_store_written_bytes_total", st)] == 7 * MiB
        assert samples[("imagefs_store_read_bytes_total", st)] == 8 * MiB
        assert samples[("imagefs_open_handles", st)] == 1
        assert samples[("imagefs_uploads_in_flight", st)] == 1
        assert samples[("imagefs_upload_pending_bytes", st)] == 3 * MiB
        assert samples[("imagefs_store_requests_total", st)] >= after["requests"]
        assert samples[("imagefs_store_errors_total", (("errno", "ENOENT"),) + st)] >= 1
        for tier in ("memory", "disk"):
            labels = (("store", "st"), ("tier", tier))
            assert samples[("imagefs_cache_hits_total", labels)] >= after["cache"][tier]["hits"]
            assert samples[("imagefs_cache_misses_total", labels)] >= \
                after["cache"][tier]["misses"]
        assert samples[("imagefs_resident_memory_bytes", ())] > 0
        assert samples[("imagefs_start_time_seconds", ())] == pytest.approx(before["started"])
    finally:
        writer.kill()
        writer.wait()


def test_status_of_something_else_fails_clearly(tmp_path: Path) -> None:
    r = run_cli("status", tmp_path)
    assert r.returncode == 1 and "no imagefs mount there" in r.stderr, r.stderr


def test_metrics_address_in_use_fails_the_mount(tmp_path: Path,
                                                file_store_table: dict[str, Any]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        cfg = write_config(tmp_path, {"s": file_store_table},
                           mount={"metrics": f"127.0.0.1:{port}"})
        (tmp_path / "mnt").mkdir()
        r = run_cli("mount", cfg, tmp_path / "mnt", "-o", f"log={tmp_path / 'log'}")
    assert r.returncode == 1 and f"metrics address 127.0.0.1:{port}" in r.stderr, r.stderr
    assert not os.path.ismount(tmp_path / "mnt")


def test_log_level_from_config_and_debug_option(mount_factory: Any,
                                                file_store_table: dict[str, Any]) -> None:
    """[mount] log_level = "warning" drops the INFO lines; -o debug logs every request."""
    Path(file_store_table["path"], "a.raw").write_bytes(b"a")
    quiet = mount_factory({"s": file_store_table}, debug=False, mount={"log_level": "warning"})
    loud = mount_factory({"t": file_store_table}, debug=True, mount={"log_level": "warning"})
    for m, sid in ((quiet, "s"), (loud, "t")):
        assert m.path(sid, "a.raw").read_bytes() == b"a"
        assert not os.path.exists(m.path(sid, "missing.raw"))
    assert " INFO " not in quiet.log_text() and " DEBUG " not in quiet.log_text()
    assert " INFO imagefs: mounted " in loud.log_text()
    assert "lookup: ENOENT (t/missing.raw)" in loud.log_text()


# ---------------------------------------------------------------------------- check-config
def test_check_config_connect(tmp_path: Path, file_store_table: dict[str, Any],
                              s3_store_table: dict[str, Any],
                              swift_store_table: dict[str, Any]) -> None:
    """ok on every real store; a wrong S3 secret and an endpoint nobody listens on are named
    with their store and reason, exit 1; a bad config is exit 2 before any connection."""
    Path(file_store_table["path"], "a.raw").write_bytes(b"a")
    good = write_config(tmp_path, {"local": file_store_table, "cold": s3_store_table,
                                   "arch": swift_store_table})
    r = run_cli("check-config", good)
    assert r.returncode == 0 and "valid; 3 store(s)" in r.stdout, r.stderr
    r = run_cli("check-config", good, "--connect")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "local (file): ok, 1 image(s)" in r.stdout
    assert "cold (s3): ok" in r.stdout and "arch (swift): ok" in r.stdout

    wrong = tmp_path / "wrong.secret"
    wrong.write_text("not-the-secret\n")
    wrong.chmod(0o600)
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    bad = write_config(bad_dir, {
        "local": file_store_table,
        "cold": {**s3_store_table, "secret_access_key_file": str(wrong), "max_attempts": 1},
        "arch": {**swift_store_table, "auth_url": f"http://127.0.0.1:{free_port()}/auth/v1.0",
                 "retries": 0, "timeout": 10}})
    r = run_cli("check-config", bad, "--connect")
    assert r.returncode == 1, r.stdout + r.stderr
    lines = {line.split(":")[0].strip(): line for line in r.stdout.splitlines()[1:]}
    assert "ok" in lines["local (file)"]
    for name in ("cold (s3)", "arch (swift)"):
        assert lines[name].split("error: ", 1)[1].strip(), lines  # a reason, not just "error"
    assert "not-the-secret" not in r.stdout + r.stderr

    broken = tmp_path / "broken.toml"
    broken.write_text(to_toml({"stores": {"x": {"type": "file"}}}))
    r = run_cli("check-config", broken, "--connect")
    assert r.returncode == 2 and f"{broken}: stores.x.path: missing" in r.stderr, r.stderr


# ------------------------------------------------------------------------------ systemd
def test_notify_socket_ready_status_stopping(tmp_path: Path,
                                             file_store_table: dict[str, Any]) -> None:
    """The daemon as systemd runs it (foreground, NOTIFY_SOCKET, stderr to the journal):
    READY=1 with a STATUS once the mount answers; on SIGTERM STOPPING=1 and a STATUS naming
    the uploads in flight, then it exits 0 unmounted, the open writer's bytes unpublished;
    log lines carry no timestamp of their own (the journal adds one)."""
    Path(file_store_table["path"], "a.raw").write_bytes(b"ready")
    cfg = write_config(tmp_path, {"s": file_store_table}, mount={"stop_timeout": 5})
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    notify = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sd:
        sd.bind(str(notify))
        sd.settimeout(60)
        log = tmp_path / "daemon.log"
        log.touch()
        st = log.stat()  # stands for the journal's stream: lines without their own timestamp
        env = {**os.environ, "NOTIFY_SOCKET": str(notify),
               "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        daemon = subprocess.Popen([*IMAGEFS, "mount", "--foreground", str(cfg), str(mnt)],
                                  env=env, stdout=subprocess.DEVNULL,
                                  stderr=open(log, "w"))  # noqa: SIM115
        writer = None
        try:
            ready = sd.recv(4096).decode()
            assert "READY=1" in ready.splitlines(), ready
            assert "STATUS=serving 1 store(s) on " + str(mnt) in ready
            assert (mnt / "s" / "a.raw").read_bytes() == b"ready"  # it answers
            writer = held_writer(mnt / "s" / "new.raw", 100000)
            daemon.send_signal(signal.SIGTERM)
            stopping = sd.recv(4096).decode()
            assert "STOPPING=1" in stopping.splitlines(), stopping
            assert "1 upload(s) in flight" in stopping, stopping
            assert daemon.wait(60) == 0, log.read_text()
        finally:
            if writer is not None:
                writer.kill()
                writer.wait()
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    assert not os.path.ismount(mnt)
    assert os.listdir(file_store_table["path"]) == ["a.raw"]
    lines = log.read_text().splitlines()
    assert any(line.startswith("INFO imagefs: mounted ") for line in lines), lines
    assert not any(line[:4].isdigit() for line in lines), "timestamps doubled in the journal"


def test_systemd_stop_lets_a_copy_finish_then_unmounts(tmp_path: Path,
                                                       file_store_table: dict[str, Any]
                                                       ) -> None:
    """The unit's ExecStop, run as systemctl stop would, on a daemon run as the unit runs it:
    a copy still writing when the stop begins finishes and is published whole; then the mount
    goes, the daemon says STOPPING=1 and exits 0 (SIGTERM, the next step, is not needed)."""
    unit = (REPO / "systemd" / "imagefs@.service").read_text()
    (stop,) = [line.split("=", 1)[1].lstrip("-") for line in unit.splitlines()
               if line.startswith("ExecStop=")]
    argv = stop.split()
    assert argv[0] == "/usr/local/bin/imagefs" and argv[-1] == "/var/lib/imagefs/%i"
    cfg = write_config(tmp_path, {"s": file_store_table})
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    notify = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sd:
        sd.bind(str(notify))
        sd.settimeout(60)
        daemon = subprocess.Popen([*IMAGEFS, "mount", "--foreground", str(cfg), str(mnt)],
                                  env={**os.environ, "NOTIFY_SOCKET": str(notify)},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        copy = None
        try:
            assert "READY=1" in sd.recv(4096).decode().splitlines()
            copy = subprocess.Popen([sys.executable, "-c", (
                "import sys,time; f=open(sys.argv[1],'wb'); f.write(b'c'*1000000); f.flush();"
                "print('ready',flush=True); time.sleep(2); f.write(b'd'*1000000); f.close()"),
                str(mnt / "s" / "copy.raw")], stdout=subprocess.PIPE, text=True)
            assert copy.stdout is not None and copy.stdout.readline().strip() == "ready"
            r = subprocess.run([*IMAGEFS, *argv[1:-1], str(mnt)], capture_output=True,
                               text=True, timeout=120)
            assert r.returncode == 0, r.stderr
            assert copy.wait(60) == 0
            assert "STOPPING=1" in sd.recv(4096).decode().splitlines()
            assert daemon.wait(60) == 0
        finally:
            for p in (copy, daemon):
                if p is not None and p.poll() is None:
                    p.kill()
                    p.wait()
            if os.path.ismount(mnt):
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    assert Path(file_store_table["path"], "copy.raw").read_bytes() == b"c" * 1000000 + \
        b"d" * 1000000
    assert not os.path.ismount(mnt)


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """systemd-analyze verify on an instance of the template (it needs ExecStart's binary and
    the Documentation= man page where tools/setup.sh installs them)."""
    tool("systemd-analyze")
    unit = tmp_path / "imagefs@images.service"
    shutil.copy(REPO / "systemd" / "imagefs@.service", tmp_path / "imagefs@.service")
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and not r.stderr.strip(), r.stdout + r.stderr


# ------------------------------------------------------------------------------ secrets
def test_no_secret_in_log_xattrs_cmdline_or_status(tmp_path: Path, mount_factory: Any,
                                                   s3_store_table: dict[str, Any],
                                                   swift_store_table: dict[str, Any]) -> None:
    """With debug logging, after writes, reads, a failed lookup, xattr dumps and renames:
    neither the S3 secret key nor the Swift key is in the daemon's log, its command line, the
    user.* attributes, status (text and JSON), the metrics, stores or check-config output.
    (trusted.imagefs.glance_location holds the S3 secret on purpose: root only, see
    imagefs(8).)"""
    tool("getfattr")
    secrets = [Path(s3_store_table["secret_access_key_file"]).read_text().strip(),
               Path(swift_store_table["key_file"]).read_text().strip()]
    assert all(len(s) >= 6 for s in secrets)  # Swift tempauth's is "testing"
    port = free_port()
    m = mount_factory({"cold": s3_store_table, "arch": swift_store_table},
                      mount={"metrics": f"127.0.0.1:{port}"})
    src = tmp_path / "src.raw"
    make_file(src, 6 * MiB, "secret")
    seen: list[str] = []
    for sid in ("cold", "arch"):
        sh("cp", src, m.path(sid, "img.raw"))
        sh("cmp", src, m.path(sid, "img.raw"))
        os.rename(m.path(sid, "img.raw"), m.path(sid, "moved.raw"))
        assert not os.path.exists(m.path(sid, "nope.raw"))
        seen.append(sh("getfattr", "-d", m.path(sid)).stdout)
        seen.append(sh("getfattr", "-d", m.path(sid, "moved.raw")).stdout)
        seen.append(run_cli("location", m.path(sid, "moved.raw")).stdout)
    pid = daemon_pid(m)
    seen.append(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"))
    seen += [run_cli("status", m.root).stdout, run_cli("status", m.root, "--json").stdout]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        seen.append(r.read().decode())
    seen += [run_cli("stores", m.root, "--json").stdout,
             run_cli("stores", m.config, "--json").stdout,
             run_cli("check-config", m.config, "--connect").stdout]
    seen.append(m.log_text())
    assert "moved.raw" in m.log_text() or "published" in m.log_text()  # the log did log
    for secret in secrets:
        for i, text in enumerate(seen):
            assert secret not in text, f"secret found in output #{i}"
