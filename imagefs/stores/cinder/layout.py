"""Volumes → images: which volumes hold images, under which file name, with which facts.

Layout (interoperable with glance_store's cinder driver both ways)
    Glance names an image's volume ``image-<image id>`` with metadata ``glance_image_id``,
    ``image_size`` (the exact byte size: volumes are whole GiB) and ``image_owner``, and sets
    the volume's read-only flag once the upload is done. Such a volume is shown under the image
    id. imagefs's own volumes are named after the file and carry ``image_size`` too, plus
    ``imagefs.<key>`` metadata (mtime, mode, Glance's hashes). A volume without a valid
    ``image_size`` holds no image and is never shown (nor is a volume that lacks one of
    ``match_metadata``, or a Glance volume that is still being written: attached and not yet
    read-only). Sizes come from ``image_size``; reads stop there.

Names and duplicates
    Cinder allows several volumes with one name, so every lookup resolves a name the same way:
    (1) a volume whose ``imagefs-replaced-by`` metadata names another volume of that name is
    being replaced and does not count; (2) of the rest, the newest (``created_at``, then id)
    wins. ``stat`` asks for the name (and ``image-<name>`` when it is a UUID) with Cinder's
    exact ``name`` filter and compares again here (MySQL compares case-insensitively).
    Cinder strips white space at both ends of a name: such a file name is kept exactly in
    ``imagefs-name`` metadata, the volume named as Cinder would have it.

Versions and locations
    ``version`` is the volume id: every upload is a new volume, renames and metadata keep it.
    Locations are ``cinder://<store id>/<volume id>``, as glance_store records locations in
    multi-store mode.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from typing import Any

from imagefs.stores.base import (
    ImageInfo,
    StoreError,
    check_name,
    is_hidden,
    meta_mode,
    meta_mtime,
    user_meta,
)

GiB = 1 << 30
#: Glance's key for the exact image size (its cinder driver reads it back the same way).
IMAGE_SIZE = "image_size"
#: imagefs's per-image metadata: ``imagefs.<key>`` (mtime, mode, hashes, uid/gid).
META_PREFIX = "imagefs."
#: Internal keys (with a '-' no user key can have): this volume is being replaced by volume
#: <id>; the exact file name, where Cinder keeps another (it strips white space at both ends).
REPLACED_KEY = "imagefs-replaced-by"
NAME_KEY = "imagefs-name"
#: Admin metadata Cinder mixes into a volume's metadata: never written back as user metadata.
ADMIN_KEYS = frozenset({"readonly", "attached_mode"})
#: Cinder shows the read-only flag (admin metadata) among the metadata.
READONLY_KEY = "readonly"
#: Prefix of the connector host imagefs attaches with: ``imagefs_<owner id>``.
CONNECTOR_PREFIX = "imagefs_"
#: Statuses in which a volume's bytes are complete and readable.
READABLE = frozenset({"available", "in-use", "attaching", "detaching", "reserved", "uploading",
                      "backing-up", "retyping"})
#: Statuses that end by themselves: an attach or delete that meets one waits and tries again.
TRANSIENT = frozenset({"attaching", "detaching", "reserved", "extending", "creating",
                       "downloading", "uploading", "backing-up", "retyping"})
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def epoch(text: Any) -> float:
    """Cinder's ``created_at`` (ISO 8601, UTC, usually without a zone) → seconds."""
    try:
        dt = datetime.datetime.fromisoformat(str(text))
    except ValueError:
        return 0.0
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.UTC)
    return dt.timestamp()


def meta_of(v: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): str(val) for k, val in (v.get("metadata") or {}).items()}


def readonly(v: Mapping[str, Any]) -> bool:
    return meta_of(v).get(READONLY_KEY, "").lower() == "true"


def cinder_name(name: str) -> str:
    """The volume name Cinder keeps for file name ``name`` (it strips white space)."""
    return name.strip() or "-"


def parse_pairs(items: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        if not sep or not key:
            raise ValueError(item)
        out[key] = value
    return out


def info(name: str, v: Mapping[str, Any], size: int) -> ImageInfo:
    meta = {k[len(META_PREFIX):]: val for k, val in meta_of(v).items()
            if k.startswith(META_PREFIX)}
    return ImageInfo(name=name, size=size,
                     mtime=meta_mtime(meta, epoch(v.get("created_at"))),
                     mode=meta_mode(meta), version=str(v["id"]), meta=meta)


def named_meta(meta: Mapping[str, str], name: str) -> dict[str, str]:
    """``meta`` (user metadata only) with the exact-name key as file name ``name`` needs."""
    out = {k: v for k, v in meta.items() if k not in ADMIN_KEYS and k != NAME_KEY}
    if cinder_name(name) != name:
        out[NAME_KEY] = name
    return out


class Layout:
    """The rules above for one store: whether Glance's volumes count, the metadata a volume
    must carry, and which attachments are this store's own (``connector_host``)."""

    def __init__(self, glance_volumes: bool, match: dict[str, str], connector_host: str
                 ) -> None:
        self.glance_volumes = glance_volumes
        self.match = match
        self.connector_host = connector_host

    def display(self, v: Mapping[str, Any]) -> str | None:
        """The file name a volume would have, or None (hidden, not a valid file name)."""
        name = str(v.get("name") or "")
        if not name or is_hidden(name):
            return None
        meta = meta_of(v)
        gid = meta.get("glance_image_id")
        exact = meta.get(NAME_KEY)
        if exact is not None and cinder_name(exact) == name:
            name = exact
        elif gid and name == f"image-{gid}":
            if not self.glance_volumes:
                return None
            name = gid
        try:
            check_name(name)
        except StoreError:
            return None
        return name

    def image_size(self, v: Mapping[str, Any]) -> int | None:
        """The exact image size, or None if the volume holds no (complete) image."""
        if str(v.get("status")) not in READABLE:
            return None
        meta = meta_of(v)
        if any(meta.get(k) != val for k, val in self.match.items()):
            return None
        try:
            size = int(meta[IMAGE_SIZE])
        except (KeyError, ValueError):
            return None
        if size < 0 or size > int(v.get("size") or 0) * GiB:
            return None
        if "glance_image_id" in meta and not readonly(v) and self.foreign_attachments(v):
            return None  # Glance is still writing it (read-only comes when it is done)
        return size

    def foreign_attachments(self, v: Mapping[str, Any], imagefs_too: bool = False
                            ) -> list[dict[str, Any]]:
        """Attachments not made by this store; with ``imagefs_too``, also other imagefs's."""
        out = []
        for a in v.get("attachments") or []:
            host = str(a.get("host_name") or "")
            if host == self.connector_host:
                continue
            if host.startswith(CONNECTOR_PREFIX) and not imagefs_too:
                continue
            out.append(dict(a))
        return out

    def pick(self, volumes: list[dict[str, Any]]) -> dict[str, tuple[dict[str, Any], int]]:
        """File name → (volume, size) by the rules in the module docstring."""
        groups: dict[str, list[tuple[dict[str, Any], int]]] = {}
        for v in volumes:
            name = self.display(v)
            if name is None:
                continue
            size = self.image_size(v)
            if size is not None:
                groups.setdefault(name, []).append((v, size))
        out = {}
        for name, group in groups.items():
            ids = {v["id"] for v, _ in group}
            live = [(v, s) for v, s in group if meta_of(v).get(REPLACED_KEY) not in ids]
            live = live or group
            out[name] = max(live, key=lambda vs: (epoch(vs[0].get("created_at")), vs[0]["id"]))
        return out

    def volume_meta(self, size: int, meta: Mapping[str, str]) -> dict[str, str]:
        """The whole metadata of a published imagefs volume."""
        out = {f"{META_PREFIX}{k}": v for k, v in user_meta(meta).items()}
        out.update(self.match)
        out[IMAGE_SIZE] = str(size)
        return out
