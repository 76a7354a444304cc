"""``imagefs demo DIR``: a ready-to-try mount on the embedded demo config, no servers needed.

Creates two file stores under DIR with a small sample raw image, writes DIR/imagefs.toml from
the packaged ``demo.toml`` and mounts it on DIR/mnt (daemonized, like ``imagefs mount``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
from importlib import resources
from pathlib import Path

from imagefs import config as config_mod
from imagefs import daemon

SAMPLE = "sample-disk.raw"
SAMPLE_SIZE = 16 << 20


def _sample_image(path: Path) -> None:
    """A 16 MiB raw disk: an MBR boot signature and a recognisable, checkable pattern."""
    if path.exists():
        return
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        block = bytearray(1 << 20)
        for i in range(SAMPLE_SIZE >> 20):
            seed = hashlib.sha256(f"imagefs demo block {i}".encode()).digest()
            block[:] = seed * (len(block) // len(seed))
            if i == 0:
                block[510:512] = b"\x55\xaa"
            f.write(block)
    os.replace(tmp, path)


def main(args: argparse.Namespace) -> int:
    root = Path(args.dir).resolve()
    (root / "stores" / "fast").mkdir(parents=True, exist_ok=True)
    (root / "stores" / "archive").mkdir(parents=True, exist_ok=True)
    mnt = root / "mnt"
    mnt.mkdir(exist_ok=True)
    _sample_image(root / "stores" / "fast" / SAMPLE)
    text = resources.files("imagefs").joinpath("demo.toml").read_text()
    cfg_path = root / "imagefs.toml"
    cfg_path.write_text(text.replace("@DIR@", str(root)))
    cfg = config_mod.load(cfg_path)
    if os.path.ismount(mnt):
        print(f"imagefs demo: already mounted on {mnt}")
        return 0
    opts = daemon.MountOptions(log_file=str(root / "imagefs.log"))
    daemon.mount(cfg, str(mnt), opts, foreground=False)
    print(f"""imagefs demo mounted on {mnt} (config {cfg_path}, log {opts.log_file})

  ls -l {mnt} {mnt}/fast
  cp {mnt}/fast/{SAMPLE} {mnt}/archive/          # copy between stores
  getfattr -d {mnt}/fast                          # store facts as xattrs
  imagefs stores {mnt}
  imagefs umount {mnt}                            # when done""")
    return 0
