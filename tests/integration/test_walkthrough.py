"""The operator walkthrough (tools/walkthrough.sh) runs as written: two stores configured and
checked, mounted from an fstab line by ``mount -a``, an image copied between them with cp and
``imagefs copy`` and verified, ``imagefs status`` read, unmounted with umount(8)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "walkthrough.sh"


def test_walkthrough_runs_as_written(tmp_path: Path) -> None:
    for helper in ("/usr/local/bin/imagefs", "/usr/sbin/mount.imagefs"):
        if not os.path.exists(helper):
            pytest.fail(f"{helper} missing: tools/setup.sh installs it")
    r = subprocess.run([str(SCRIPT), str(tmp_path / "w")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "fast (file): ok" in out and "archive (file): ok" in out
    assert "/w/mnt/archive/disk.raw: OK sha512:" in out
    status = out.split("== what the mount did", 1)[1]
    archive = next(line for line in status.splitlines() if line.startswith("archive "))
    assert archive.split()[4:6] == ["16.0", "MiB"], archive  # written: cp + imagefs copy
    assert "walkthrough done" in out
    assert not os.path.ismount(tmp_path / "w" / "mnt")
