"""The cinder store's rules on volume records (no Cinder needed: these are the decisions made
from what Cinder returns; tests/integration/test_store_cinder.py runs them against Cinder)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from imagefs import config as config_mod
from imagefs.stores import build
from imagefs.stores.base import Unsupported
from imagefs.stores.cinder import CinderStore
from imagefs.stores.cinder.layout import NAME_KEY, REPLACED_KEY, cinder_name
from imagefs.stores.cinder.rbdio import rbd_spec

GID = "0b0c3a5e-6d0e-4d3f-9a57-2f3c8a1f00aa"


def store(tmp_path: Path, **extra: Any) -> CinderStore:
    table = {"type": "cinder", "auth": "noauth", "endpoint": "http://127.0.0.1:1/v3",
             "user_id": "u", "project_id": "p", "ceph_conf": "/nonexistent", **extra}
    s = build(config_mod.parse({"stores": {"c": table}}, tmp_path / "c.toml").stores[0])
    assert isinstance(s, CinderStore)
    return s


def vol(vid: str, name: str, size: int | None = 100, created: str = "2026-01-01T00:00:00",
        status: str = "available", **meta: str) -> dict[str, Any]:
    md = dict(meta)
    if size is not None:
        md["image_size"] = str(size)
    return {"id": vid, "name": name, "status": status, "size": 1, "created_at": created,
            "metadata": md, "attachments": []}


def test_rbd_spec_and_other_volume_types() -> None:
    assert rbd_spec("c", "v", {"driver_volume_type": "rbd", "name": "vols/volume-v"}) == \
        ("vols", "", "volume-v")
    with pytest.raises(Unsupported, match="'iscsi'"):
        rbd_spec("c", "v", {"driver_volume_type": "iscsi", "target_iqn": "x"})


def test_which_volumes_are_images(tmp_path: Path) -> None:
    s = store(tmp_path)
    vols = [vol("1", "plain.raw"), vol("2", "no-size", size=None),
            vol("3", ".imagefs-host_1_2_ab"), vol("4", "too-big", size=2 << 30),
            vol("5", f"image-{GID}", glance_image_id=GID),
            vol("6", "creating.raw", status="creating"),
            vol("7", "stripped", **{NAME_KEY: " stripped "})]
    assert {n: v["id"] for n, (v, _) in s.layout.pick(vols).items()} == {
        "plain.raw": "1", GID: "5", " stripped ": "7"}
    assert store(tmp_path, glance_volumes=False).layout.pick(vols).keys() == {"plain.raw",
                                                                        " stripped "}
    # Glance still writing: attached, not yet read-only
    writing = vol("8", f"image-{GID}", glance_image_id=GID)
    writing["attachments"] = [{"host_name": "glance-host", "attachment_id": "a"}]
    assert s.layout.pick([writing]) == {}
    writing["metadata"]["readonly"] = "True"
    assert list(s.layout.pick([writing])) == [GID]
    only = store(tmp_path, match_metadata=["tier=fast"])
    assert list(only.layout.pick([vol("1", "a"), vol("2", "b", tier="fast")])) == ["b"]


def test_one_name_one_volume(tmp_path: Path) -> None:
    s = store(tmp_path)
    old = vol("old", "a.raw", created="2026-01-02T00:00:00", **{REPLACED_KEY: "new"})
    new = vol("new", "a.raw", created="2026-01-01T00:00:00")
    assert s.layout.pick([old, new])["a.raw"][0]["id"] == "new"  # tagged: being replaced
    other = vol("x", "a.raw", created="2026-01-03T00:00:00")
    assert s.layout.pick([new, other])["a.raw"][0]["id"] == "x"  # otherwise the newest
    assert cinder_name(" a ") == "a" and cinder_name("\t") == "-"


def test_config_keys(tmp_path: Path) -> None:
    with pytest.raises(config_mod.ConfigError, match="stores.c.endpoint"):
        store(tmp_path, endpoint="ftp://x")
    with pytest.raises(config_mod.ConfigError, match="stores.c.detach_after"):
        store(tmp_path, detach_after=-1.0)


def test_keystone_catalog_endpoint() -> None:
    """The volume endpoint chosen from a Keystone v3 catalog (as a token body carries it)."""
    from imagefs.stores.cinder.api import CinderApi

    catalog = [
        {"type": "volumev2", "endpoints": [{"interface": "public", "url": "http://v2"}]},
        {"type": "volumev3", "endpoints": [
            {"interface": "internal", "region": "R1", "url": "http://int-r1/v3/p"},
            {"interface": "public", "region": "R1", "url": "http://pub-r1/v3/p"},
            {"interface": "public", "region": "R2", "url": "http://pub-r2/v3/p"}]}]
    opts = {"interface": "public", "region": "R2"}
    assert CinderApi("c", opts, 5, str)._catalog_url(catalog, "x") == "http://pub-r2/v3/p"
    opts = {"interface": "internal", "region": ""}
    assert CinderApi("c", opts, 5, str)._catalog_url(catalog, "x") == "http://int-r1/v3/p"
    opts = {"interface": "admin", "region": ""}
    with pytest.raises(Exception, match="no admin block-storage endpoint"):
        CinderApi("c", opts, 5, str)._catalog_url(catalog, "x")
