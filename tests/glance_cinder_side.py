"""The Glance side of the cinder interoperability test: glance_store's own cinder driver, set
up as glance-api sets it up (multi-store, noauth Cinder through ``cinder_endpoint_template``).

Run by ``tests/integration/test_store_cinder.py`` with Debian's ``/usr/bin/python3 -I`` and a
clean environment, as glance-api runs, inside a private mount namespace whose /etc/ceph holds
the keyring (os-brick's RBD connector reads ``/etc/ceph/<cluster>.client.<user>.keyring``;
Cinder no longer hands keyrings out). It imports nothing from this project.

Two settings stand in for a glance-api deployment: the request context carries a (empty)
service catalog, as Keystone's middleware would give it, and os-brick's privileged calls run in
this process (we are root already; glance-api runs them through sudo and privsep-helper).

Usage: ``python3 -I tests/glance_cinder_side.py REQUEST.json`` prints one JSON object:
``{"get": {...}, "add": {...}}`` for the operations asked. REQUEST::

    {"workdir": DIR, "store": ID, "endpoint": "http://HOST:PORT/v3",
     "user_id": U, "project_id": P,
     "get": LOCATION,                         # optional: read an image, return size + sha256
     "add": {"id": IMAGE_ID, "file": PATH}}   # optional: store a file as image IMAGE_ID
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import sys
from typing import Any


def main(path: str) -> dict[str, Any]:
    with open(path) as f:
        req = json.load(f)
    logging.basicConfig(level=logging.ERROR)
    import glance_store.multi_backend as mb
    import os_brick.privileged
    from glance_store import location
    from oslo_config import cfg
    from oslo_context import context

    os_brick.privileged.default.set_client_mode(False)
    workdir, sid = req["workdir"], req["store"]
    conf_file = f"{workdir}/glance-api.conf"
    with open(conf_file, "w") as f:
        f.write(f"[DEFAULT]\nenabled_backends = {sid}:cinder\n\n"
                f"[glance_store]\ndefault_backend = {sid}\n\n"
                f"[{sid}]\ncinder_endpoint_template = {req['endpoint']}/%(project_id)s\n"
                f"cinder_use_multipath = false\ncinder_mount_point_base = {workdir}/mnt\n"
                f"rootwrap_config = {workdir}/rootwrap.conf\n"
                "cinder_state_transition_timeout = 60\n")
    conf = cfg.CONF
    conf.register_opt(cfg.DictOpt("enabled_backends"))
    conf(args=[], project="glance", default_config_files=[conf_file])
    mb.register_store_opts(conf)
    mb.create_multi_stores(conf)
    mb.verify_store()
    ctx = context.RequestContext(user_id=req["user_id"], project_id=req["project_id"],
                                 auth_token=f"{req['user_id']}:{req['project_id']}")
    ctx.service_catalog = []
    store = mb.get_store_from_store_identifier(sid)
    out: dict[str, Any] = {}
    if "get" in req:
        loc = location.get_location_from_uri_and_backend(req["get"], sid, conf=conf)
        chunks, size = store.get(loc, context=ctx)
        h, n = hashlib.sha256(), 0
        for chunk in chunks:
            h.update(chunk)
            n += len(chunk)
        out["get"] = {"size": size, "bytes": n, "sha256": h.hexdigest(),
                      "size_from_uri": store.get_size(loc, context=ctx)}
    if "add" in req:
        with open(req["add"]["file"], "rb") as f:
            data = f.read()
        url, size, md5, multihash, _ = store.add(req["add"]["id"], io.BytesIO(data), len(data),
                                                 "sha512", context=ctx)
        out["add"] = {"location": url, "size": size, "md5": md5, "multihash": multihash}
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
