"""``type = "swift"``: images are objects in one OpenStack Swift container (or RGW's Swift API).

An image is a plain object, a Static Large Object imagefs wrote (segments in a second
container), or a Dynamic Large Object Glance wrote. One module per job; each module's docstring
records the backend protocols it relies on:

``store``
    ``SwiftStore``: options, lifetime, delete and metadata, and the hand-off to the parts below.
``auth``
    Credentials: options and the ``ST_*``/``OS_*`` environment, the key, TLS.
``connection``
    Per-thread swiftclient connections sharing one token; error mapping; the worker pool.
``layout``
    Naming (segment groups, safe names), manifest metadata, DLO manifests, segment maps.
``listing``
    HEADs, the remembered listing, DLO checks (``Busy`` for a segment of a DLO).
``reading``
    Ranged GETs pinned to a version, through segment maps where possible (RGW If-Match).
``segments``
    The hand-written chunked segment PUT fed through a bounded queue.
``upload``
    ``SwiftUpload``: buffering, streaming, publishing with one manifest PUT.
``journal``
    Markers for segments at stake, safe deletion of segment groups, the clean-up at mount.
``rename``
    The copy-then-delete rename protocol and how a crash in it is settled.
"""

from imagefs.stores.swift.store import SwiftStore

__all__ = ["SwiftStore"]
