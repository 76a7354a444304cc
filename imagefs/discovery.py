"""``imagefs stores``: what stores exist, Glance-style (GET /v2/info/stores/detail).

From a config file it opens the stores to ask for usage; from a mount point it reads the
``user.imagefs.*`` attributes of each store directory and counts its images from the listing
the mount already keeps (``--no-usage`` skips that).
Never prints a secret: only ``Store.properties()``, which stores keep free of credentials.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from imagefs import config as config_mod
from imagefs import stores as registry

_XA = "user.imagefs."


def _from_config(path: str, usage: bool) -> list[dict[str, Any]]:
    cfg = config_mod.load(path)
    rows = []
    for sc in cfg.stores:
        store = registry.build(sc)
        props: dict[str, Any] = {}
        if usage:
            try:
                store.open()
                props.update(store.properties())
                u = store.usage()
                if u is not None:
                    props["images"], props["bytes"] = u
                store.close()
            except Exception as e:  # usage is best effort; say why it is missing
                props["error"] = str(e)
        rows.append({"id": sc.id, "type": sc.type, "description": sc.description,
                     "default": sc.default, "read-only": sc.read_only or sc.type == "http",
                     "weight": sc.weight, "properties": props})
    return rows


def _usage_of_dir(path: str) -> dict[str, Any]:
    images = size = 0
    try:
        with os.scandir(path) as it:
            for entry in it:
                if entry.is_file(follow_symlinks=False):
                    images += 1
                    size += entry.stat(follow_symlinks=False).st_size
    except OSError as e:  # a store that cannot list (EIO): say why the usage is missing
        return {"error": e.strerror or str(e)}
    return {"images": images, "bytes": size}


def _from_mount(mnt: str, usage: bool) -> list[dict[str, Any]]:
    rows = []
    for name in sorted(os.listdir(mnt)):
        path = os.path.join(mnt, name)
        if os.path.islink(path) or not os.path.isdir(path):
            continue
        try:
            attrs = {k[len(_XA):]: os.getxattr(path, k).decode() for k in os.listxattr(path)
                     if k.startswith(_XA)}
        except OSError:
            continue
        rows.append({"id": name, "type": attrs.get("type", ""),
                     "description": attrs.get("description", ""),
                     "default": attrs.get("default") == "true",
                     "read-only": attrs.get("read_only") == "true",
                     "weight": int(attrs.get("weight", "0") or 0),
                     "properties": _usage_of_dir(path) if usage else {}})
    return rows


def main(args: argparse.Namespace) -> int:
    try:
        if os.path.isdir(args.source):
            rows = _from_mount(args.source, usage=not args.no_usage)
        else:
            rows = _from_config(args.source, usage=not args.no_usage)
    except config_mod.ConfigError as e:
        print(f"imagefs: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"stores": rows}, indent=2))
        return 0
    print(f"{'ID':<16} {'TYPE':<6} {'DEFAULT':<7} {'RO':<3} {'WEIGHT':>6} {'IMAGES':>7} "
          f"{'BYTES':>14}  DESCRIPTION")
    for r in rows:
        p = r["properties"]
        print(f"{r['id']:<16} {r['type']:<6} {'yes' if r['default'] else '':<7} "
              f"{'yes' if r['read-only'] else '':<3} {r['weight']:>6} "
              f"{p.get('images', '-')!s:>7} {p.get('bytes', '-')!s:>14}  {r['description']}")
    return 0
