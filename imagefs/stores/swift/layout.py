"""How imagefs lays images out in Swift: segment names, manifest metadata, DLO manifests.

An image is a plain object (small images: one PUT at commit) or a Static Large Object whose
segments live in ``segment_container`` (default ``<container>_segments``) under
``<name>/<upload-id>/<NNNNNNNN>``; ``<name>`` is the image name with every character outside
``[A-Za-z0-9._-]`` replaced by ``_`` (RGW URL-decodes segment paths in SLO deletes, so a '%'
in a segment name would orphan it) and an ``x`` in front of a leading ``_`` (RGW does not
find SLO segments named ``_...``); the upload id is an owner id from ``owners.py``
(``<host>_<pid>_<starttime>_<random>``).

The manifest records its segment group (``<name>/<upload-id>``) in
``X-Object-Meta-Imagefs-Segments``, and the SLO's size and ETag in ``-Imagefs-Size`` and
``-Imagefs-Etag``; copies (rename) keep them, so every imagefs operation can find an image's
segments without reading the manifest (RGW cannot return SLO manifests) and a HEAD of the
manifest alone describes the image (see ``listing.Listing.head_headers``). mtime, mode and
Glance's hashes are ``X-Object-Meta-*`` headers.

Dynamic Large Objects (Glance's large images): glance_store's Swift driver writes an image
above ``swift_store_large_object_size`` as a DLO: segments ``<id>-00001``... in the same
container and a 0-byte manifest whose ``X-Object-Manifest: <container>/<prefix>`` makes the
image the concatenation, in name order, of the objects under that prefix. Size and version (the
md5 of the segments' ETags, on Swift and RGW alike) come from a full HEAD. Deleting a DLO
deletes its manifest, then its segments; replacing one (upload or rename onto its name)
deletes them after the publish (``journal.Journal.drop_dlo_segments``); segments another
manifest covers too are kept, and so are segments in other containers. Metadata POSTs re-send
the manifest header (Swift drops it otherwise: ``kept_headers``).
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from imagefs.stores.base import BackendError, ImageInfo, meta_mode, meta_mtime
from imagefs.stores.ranges import http_date

#: The manifest header naming its segment group (``<safe name>/<upload-id>``).
SEGMENTS_META = "imagefs_segments"
#: The SLO's size and ETag as its manifest PUT made them: what a HEAD of the manifest alone
#: (``?multipart-manifest=get``) needs to describe the image.
SIZE_META = "imagefs_size"
ETAG_META = "imagefs_etag"
OWN_META = (SEGMENTS_META, SIZE_META, ETAG_META)
META = "x-object-meta-"
#: User-metadata names servers use themselves (RGW shows its SLO flag as one).
SERVER_META = frozenset({"static_large_object"})
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_name(name: str) -> str:
    """The image's part of its segment names: ASCII only, never starting with '_'.

    RGW (16.2) cannot resolve SLO segments whose name starts with '_' (it escapes such names
    in its bucket index): the manifest PUT succeeds, then every HEAD/GET of the image is 404.
    """
    safe = _UNSAFE.sub("_", name)[:64]
    return safe if safe and not safe.startswith("_") else "x" + safe


def group_of(name: str, upload_id: str) -> str:
    """The segment group of one upload of ``name``: the prefix of all its segments."""
    return f"{safe_name(name)}/{upload_id}"


def segment_name(group: str, index: int) -> str:
    return f"{group}/{index:08d}"


def etag_of_segments(etags: Iterable[str]) -> str:
    """An SLO's (and a DLO's) ETag: the md5 of its segments' ETags, concatenated."""
    return hashlib.md5("".join(etags).encode(), usedforsecurity=False).hexdigest()


def meta_headers(meta: Mapping[str, str]) -> dict[str, str]:
    """``os_hash_algo`` → ``X-Object-Meta-Os-Hash-Algo`` (servers turn '_' into '-' anyway)."""
    return {"X-Object-Meta-" + k.replace("_", "-"): v for k, v in meta.items()}


def kept_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """What a metadata POST must send back besides user metadata so the object stays what it
    is: a DLO's ``X-Object-Manifest`` (Glance's large images). Swift drops it on a POST
    without it, which leaves a 0-byte object and orphans the segments."""
    manifest = headers.get("x-object-manifest")
    return {"X-Object-Manifest": manifest} if manifest else {}


def meta_of(headers: Mapping[str, str], keep_server: bool = False) -> dict[str, str]:
    """User metadata from headers; ``keep_server`` keeps the server's own flags, which a POST
    (it replaces all user metadata) must send back: RGW forgets an SLO flag left out."""
    meta = {k[len(META):].replace("-", "_"): v for k, v in headers.items()
            if k.startswith(META)}
    return {k: v for k, v in meta.items() if keep_server or k not in SERVER_META}


def is_slo(headers: Mapping[str, str]) -> bool:
    """RGW marks an SLO's manifest with a user-metadata flag only; Swift with its own header."""
    return "true" in (headers.get("x-static-large-object", "").lower(),
                      headers.get(META + "static-large-object", "").lower())


@dataclass(frozen=True)
class Dlo:
    """A Dynamic Large Object's manifest: the image is the concatenation, in name order, of
    the objects of ``container`` whose names start with ``prefix``."""

    container: str
    prefix: str

    def covers(self, container: str, name: str) -> bool:
        return container == self.container and name.startswith(self.prefix)


def dlo_of(headers: Mapping[str, str]) -> Dlo | None:
    """The DLO a HEAD describes, from ``X-Object-Manifest: <container>/<prefix>`` (URL-decoded,
    as Swift's dlo middleware reads it), or None for anything else."""
    value = headers.get("x-object-manifest")
    if not value or "/" not in value:
        return None
    container, prefix = urllib.parse.unquote(value).split("/", 1)
    return Dlo(container, prefix) if container else None


@dataclass(frozen=True)
class SegmentMap:
    """The segments of one SLO or DLO version, in order: where each starts, its size, name,
    ETag, and the container holding them."""

    starts: list[int]
    sizes: list[int]
    names: list[str]
    etags: list[str]
    container: str


def info_of(what: str, name: str, headers: Mapping[str, str], manifest: bool = False
            ) -> tuple[ImageInfo, str | None, bool] | None:
    """(info, segment group of our SLOs, is an SLO) from HEAD's headers (``what`` names the
    store in errors).

    ``manifest``: the headers come from ``?multipart-manifest=get``, which describe an
    SLO's manifest object rather than the image: usable only with the size and ETag our
    manifest PUT recorded; None for other SLOs and for DLOs (a full HEAD is needed).
    """
    meta = meta_of(headers)
    group = meta.pop(SEGMENTS_META, None)
    own_size, own_etag = meta.pop(SIZE_META, None), meta.pop(ETAG_META, None)
    slo = is_slo(headers)
    size_text, version = headers.get("content-length"), headers.get("etag", "").strip('"')
    if manifest:
        if slo and group and own_size and own_etag:
            size_text, version = own_size, own_etag
        elif slo or "x-object-manifest" in headers or size_text in ("0", None):
            return None  # foreign SLO, DLO, or on RGW an SLO whose flag a POST removed
    try:
        size = int(size_text or "")
    except ValueError:
        raise BackendError(f"{what}: {name}: no usable Content-Length") from None
    try:
        stamp = float(headers.get("x-timestamp", ""))
    except ValueError:
        stamp = http_date(headers.get("last-modified"))
    info = ImageInfo(name=name, size=size, mtime=meta_mtime(meta, stamp),
                     mode=meta_mode(meta), version=version, meta=meta)
    return info, (group if slo else None), slo
