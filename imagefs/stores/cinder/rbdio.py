"""The data path of RBD-backed Cinder volumes: librbd with the store's own Ceph credentials.

Cinder's attachment hands out a flat ``connection_info`` for RBD volumes
(``driver_volume_type: rbd``, ``name: pool/volume-<id>``, ``hosts``, ``ports``,
``auth_username``); os-brick would go through a kernel mapping or look for keyrings under
/etc/ceph only. imagefs opens the image with librbd, as the rbd store does: no kernel module,
no root helper, and the cluster named by the store's ``ceph_conf`` with its own keyring. Error
mapping, timeouts and the ``rbd_id`` object are the rbd store's (``imagefs.stores.rbd.cluster``).

One ``rados.Rados`` per store, connected at the first attachment (its cephx user is
``ceph_user``, else the ``auth_username`` Cinder reports) and kept until ``close``. The
librados timeouts are the store's ``timeout``, so a dead cluster is an error, never a hang.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from imagefs.stores.base import BackendError, NotFound, Unsupported
from imagefs.stores.rbd.cluster import client_conf, close_image, rbd_error, unpack_id

log = logging.getLogger(__name__)


def rbd_spec(store_id: str, vid: str, ci: Any) -> tuple[str, str, str]:
    """(pool, namespace, image) from a connection_info; Unsupported for other volume types."""
    if not isinstance(ci, dict):
        raise BackendError(f"store {store_id}: volume {vid}: attachment without connection info")
    kind = ci.get("driver_volume_type") or "unknown"
    if kind != "rbd":
        raise Unsupported(
            f"store {store_id}: volume {vid} is a {kind!r} volume: the cinder store reads and "
            "writes RBD-backed volumes only (driver_volume_type rbd)")
    parts = str(ci.get("name") or "").split("/")
    if len(parts) == 2 and all(parts):
        return parts[0], "", parts[1]
    if len(parts) == 3 and all(parts):
        return parts[0], parts[1], parts[2]
    raise BackendError(f"store {store_id}: volume {vid}: unexpected RBD name {ci.get('name')!r}")


class RbdAccess:
    """The store's librados client and its I/O contexts, one per (pool, namespace)."""

    def __init__(self, store_id: str, conf: str, user: str, keyring: str | None,
                 timeout: float) -> None:
        self.store_id = store_id
        self.conf = conf
        self.user = user
        self.keyring = keyring
        self.timeout = timeout
        self.cluster: Any = None
        self.rbd: Any = None
        self._ioctx: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def connect(self, cinder_user: str = "") -> None:
        """Connect once; the cephx user is ours, else the one Cinder names."""
        with self._lock:
            if self.cluster is not None:
                return
            import rados
            import rbd

            self.rbd = rbd
            user = self.user or cinder_user or "admin"
            user = user[len("client."):] if user.startswith("client.") else user
            conf = client_conf(self.timeout, self.keyring)
            where = f"store {self.store_id}: Ceph cluster {self.conf} as client.{user}"
            try:
                cluster = rados.Rados(conffile=self.conf, rados_id=user, conf=conf)
            except Exception as e:
                raise BackendError(f"{where}: {e}") from None
            try:
                cluster.connect(timeout=int(conf["client_mount_timeout"]))
            except Exception as e:
                cluster.shutdown()
                raise BackendError(f"{where}: {e}") from None
            self.cluster = cluster
            log.info("store %s: connected to Ceph cluster %s as client.%s", self.store_id,
                     cluster.get_fsid(), user)

    def ioctx(self, pool: str, namespace: str = "") -> Any:
        with self._lock:
            if self.cluster is None:
                raise BackendError(f"store {self.store_id}: not connected to Ceph")
            key = (pool, namespace)
            io = self._ioctx.get(key)
            if io is None:
                try:
                    io = self.cluster.open_ioctx(pool)
                except Exception as e:
                    err = rbd_error(e, f"store {self.store_id}: pool {pool!r} in cluster "
                                       f"{self.conf}")
                    raise (BackendError(str(err)) if isinstance(err, NotFound) else err) \
                        from None
                if namespace:
                    io.set_namespace(namespace)
                self._ioctx[key] = io
            return io

    def open(self, spec: tuple[str, str, str], read_only: bool) -> Any:
        """An ``rbd.Image`` of the volume (rbd_spec), opened read-only or read-write."""
        pool, ns, image = spec
        io = self.ioctx(pool, ns)
        try:
            return self.rbd.Image(io, image, read_only=read_only)
        except Exception as e:
            raise rbd_error(e, f"store {self.store_id}: RBD image {pool}/{image}") from None

    def image_id(self, spec: tuple[str, str, str]) -> str:
        """The id the image name refers to now ("" if none): one small read of librbd's own
        name -> id object ``rbd_id.<name>`` (a u32 length, then the id)."""
        pool, ns, image = spec
        try:
            raw = self.ioctx(pool, ns).read("rbd_id." + image, 4096, 0)
        except Exception as e:
            err = rbd_error(e, f"store {self.store_id}: RBD image {pool}/{image}")
            if isinstance(err, NotFound):
                return ""
            raise err from None
        return unpack_id(raw) or ""

    def watchers(self, spec: tuple[str, str, str]) -> list[str]:
        """Addresses of clients watching the image (read-write opens: VMs, rbd map)."""
        image = self.open(spec, read_only=True)
        try:
            return [str(w.get("addr")) for w in image.watchers_list()]
        except Exception as e:
            raise rbd_error(e, f"store {self.store_id}: watchers of {spec[2]}") from None
        finally:
            close_image(image)

    def close(self) -> None:
        with self._lock:
            ioctxs, self._ioctx = list(self._ioctx.values()), {}
            cluster, self.cluster = self.cluster, None
        for io in ioctxs:
            try:
                io.close()
            except Exception as e:
                log.debug("closing an ioctx: %s", e)
        if cluster is not None:
            cluster.shutdown()
