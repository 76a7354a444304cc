"""The Glance side of the interoperability tests: glance_store's own drivers, set up as glance-api
sets them up, doing what the test asks.

Run by ``tests/integration/test_glance_interop.py`` with Debian's ``/usr/bin/python3 -I`` and a
clean environment, as glance-api runs: no venv, no AWS/Ceph/Swift variables, nothing of imagefs
on ``sys.path`` (``-I`` leaves out the script's directory too), so it proves what Glance itself
does, not what imagefs's own libraries would. It must therefore import nothing from this project.

Usage: ``python3 -I tests/glance_side.py REQUEST.json`` prints one JSON object on stdout:
``{"results": [...]}``, one entry per operation, each ``{"ok": true, ...}`` or
``{"ok": false, "error": "<exception class>", "message": "..."}`` (a failed operation does not
stop the next). REQUEST::

    {"workdir": DIR,                       # config files go here
     "stores": {ID: {"type": "file" | "rbd" | "swift" | "s3", OPTION: VALUE, ...}},
     "ops": [{"op": "add", "backend": ID, "id": IMAGE_ID, "file": PATH, "algo": "sha512"},
             {"op": "get", "backend": ID, "uri": LOCATION, "out": PATH},
             {"op": "delete", "backend": ID, "uri": LOCATION}]}

Store options are glance_store's own (``filesystem_store_datadir``, ``rbd_store_pool``,
``s3_store_host``...); a swift store's ``reference`` table becomes the ``[ref1]`` section of its
``swift_store_config_file``. ``add`` returns Glance's location, size, checksum (md5) and
multihash; ``get`` writes the bytes ``glance_store.get`` yields to ``out`` and returns their
size, md5 and sha512, ``get_size_from_uri_and_backend``'s size and the parsed location's fields.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from typing import Any

#: Location fields worth returning (never the keys or secrets they may hold).
_FIELDS = ("scheme", "path", "fsid", "pool", "image", "snapshot", "container", "obj",
           "bucket", "key", "s3serviceurl", "auth_or_store_url")


def _write_config(req: dict[str, Any]) -> str:
    """An oslo.config file for multi-store mode, as glance-api.conf has it."""
    workdir = req["workdir"]
    os.makedirs(workdir, exist_ok=True)
    stores = req["stores"]
    lines = ["[DEFAULT]",
             "enabled_backends = " + ",".join(f"{sid}:{s['type']}" for sid, s in stores.items()),
             "", "[glance_store]", f"default_backend = {next(iter(stores))}", ""]
    for sid, opts in stores.items():
        lines.append(f"[{sid}]")
        for key, value in opts.items():
            if key == "type":
                continue
            if key == "reference":  # the swift credentials file, as glance-swift.conf
                path = os.path.join(workdir, f"{sid}-swift.conf")
                with open(path, "w") as f:
                    f.write("[ref1]\n" + "".join(f"{k} = {v}\n" for k, v in value.items()))
                lines += [f"swift_store_config_file = {path}", "default_swift_reference = ref1"]
                continue
            lines.append(f"{key} = {str(value).lower() if isinstance(value, bool) else value}")
        lines.append("")
    path = os.path.join(workdir, "glance-api.conf")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def _setup(config_file: str) -> Any:
    """What glance-api does at start: enabled_backends, register_store_opts,
    create_multi_stores, verify_store."""
    import glance_store.multi_backend as mb
    from oslo_config import cfg

    conf = cfg.CONF
    conf.register_opt(cfg.DictOpt("enabled_backends"))
    conf(args=[], project="glance", default_config_files=[config_file])
    mb.register_store_opts(conf)
    mb.create_multi_stores(conf)
    mb.verify_store()
    return conf


def _run(conf: Any, op: dict[str, Any]) -> dict[str, Any]:
    import glance_store.location as location
    import glance_store.multi_backend as mb

    backend = op["backend"]
    if op["op"] == "add":
        with open(op["file"], "rb") as f:
            size = os.fstat(f.fileno()).st_size
            loc, written, checksum, multihash, meta = mb.add_with_multihash(
                conf, op["id"], f, size, backend, op.get("algo", "sha512"))
        return {"location": loc, "size": written, "checksum": checksum,
                "multihash": multihash, "metadata": meta}
    if op["op"] == "get":
        parsed = location.get_location_from_uri_and_backend(op["uri"], backend, conf=conf)
        fields = {k: getattr(parsed.store_location, k) for k in _FIELDS
                  if isinstance(getattr(parsed.store_location, k, None), str)}
        data, size = mb.get(op["uri"], backend)
        md5, sha512, n = hashlib.md5(), hashlib.sha512(), 0
        with open(op["out"], "wb") as out:
            for chunk in data:
                out.write(chunk)
                md5.update(chunk)
                sha512.update(chunk)
                n += len(chunk)
        return {"size": size, "read": n, "md5": md5.hexdigest(), "sha512": sha512.hexdigest(),
                "get_size": mb.get_size_from_uri_and_backend(op["uri"], backend),
                "fields": fields}
    if op["op"] == "delete":
        mb.delete(op["uri"], backend)
        return {}
    raise ValueError(f"unknown op {op['op']!r}")


def main() -> int:
    with open(sys.argv[1]) as f:
        req = json.load(f)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    conf = _setup(_write_config(req))
    results = []
    for op in req["ops"]:
        try:
            results.append({"ok": True, **_run(conf, op)})
        except Exception as e:  # reported to the test, which decides what was expected
            results.append({"ok": False, "error": type(e).__name__, "message": str(e)})
    json.dump({"results": results}, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
