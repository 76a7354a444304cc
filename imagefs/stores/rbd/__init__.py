"""``type = "rbd"``: images are RBD images in one Ceph pool (optionally one RBD namespace).

This is how Glance and Nova keep images, so hypervisors using Ceph directly see the same images.
Each store has its own cluster connection (``conf``, ``user``, ``keyring``), so one mount can
serve several clusters, and several pools of one cluster, at once.

Where things are (each module's docstring records the backend protocol it concerns):

- ``store.py``: ``RbdStore``, the store interface, orchestrating the pieces below.
- ``cluster.py``: the librados client: lazy import, timeouts, blocklisting and reconnecting,
  librbd error mapping, the ``rbd_id.<name>`` name → id object.
- ``layout.py``: names (hidden uploads, ``-old`` images), metadata keys, Glance's snapshot
  ``snap`` and ``rbd://`` location; what ``version`` means.
- ``upload.py``: ``RbdUpload``, an image written in place and published by rename, and
  ``ImageUpload``, the mutex-and-deadline discipline it shares with the cinder store.
- ``replace.py``: renaming onto an existing image in three steps, and what may be removed.
- ``leftovers.py``: crash recovery at mount (restoring images moved aside, stale id objects).
- ``reading.py``: read handles and the check after every read.
- ``facts.py``: the stat cache.
"""

from imagefs.stores.rbd.store import RbdStore

__all__ = ["RbdStore"]
