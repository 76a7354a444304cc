"""``type = "cinder"``: images are Cinder volumes, one volume per image, as Glance keeps them.

Only RBD-backed volumes are served: the bytes are read and written with librbd and the store's
own Ceph configuration. Where things are (each module's docstring records the protocol it
concerns):

- ``store.py``: ``CinderStore``, the store interface, orchestrating the pieces below.
- ``layout.py``: which volumes are images, under which name (Glance's ``image-<id>``,
  duplicates, stripped names), metadata keys, versions and locations.
- ``api.py``: Cinder's REST API and Keystone auth.
- ``volumes.py``: creating, attaching, detaching and deleting volumes.
- ``spare.py``: the next upload's volume, made and attached ahead.
- ``upload.py``: ``CinderUpload``, a hidden volume written with librbd, published by one PUT.
- ``replace.py``: publishing onto an existing image's name, and the refusals (read-only,
  attached, watched).
- ``reading.py``: shared read attachments and Images, idle detach, reads without attachment.
- ``leftovers.py``: crash recovery at mount.
- ``rbdio.py``: the librbd data path with the store's Ceph credentials.
"""

from imagefs.stores.cinder.store import CinderStore

__all__ = ["CinderStore"]
