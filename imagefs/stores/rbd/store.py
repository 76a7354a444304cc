"""``RbdStore``: the store interface over the pieces of this package (see ``__init__.py``)."""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from imagefs.options import StoreConfig, option
from imagefs.stores.base import (
    Capability,
    Changed,
    ImageInfo,
    NotFound,
    OptionError,
    Store,
    StoreError,
    Unsupported,
    Upload,
    check_name,
    is_hidden,
    user_meta,
)
from imagefs.stores.owners import leftover_age_option
from imagefs.stores.rbd.cluster import Client, close_image
from imagefs.stores.rbd.facts import Facts
from imagefs.stores.rbd.layout import META_PREFIX, SNAP, glance_location
from imagefs.stores.rbd.leftovers import Leftovers
from imagefs.stores.rbd.reading import Reader
from imagefs.stores.rbd.replace import Replacer
from imagefs.stores.rbd.upload import RbdUpload

log = logging.getLogger(__name__)

#: Images opened at once to fill the stat cache in ``list()``.
LIST_WORKERS = 8


@dataclass(frozen=True)
class RbdOptions:
    conf: str = option("path", required=True, help="ceph.conf of the cluster")
    pool: str = option("str", required=True, help="RADOS pool holding the images")
    user: str = option("str", default="admin",
                       help="cephx client id (client.<user>); its key from conf or keyring")
    keyring: str | None = option("path", help="keyring file, if ceph.conf does not name it")
    namespace: str = option("str", default="", help="RBD namespace within the pool")
    glance_layout: bool = option("bool", default=False,
                                 help="after publish, create and protect snapshot 'snap'")
    stat_ttl: float = option("seconds", default=10.0,
                             help="seconds image facts (size, metadata) are reused per image id")
    leftover_age: float = leftover_age_option()


class RbdStore(Store):
    type_name = "rbd"
    Options = RbdOptions
    capabilities = Capability.RANDOM_WRITE
    opts: RbdOptions

    def __init__(self, cfg: StoreConfig) -> None:
        super().__init__(cfg)
        o = self.opts
        user = o.user or "admin"
        self.user: str = user[len("client."):] if user.startswith("client.") else user
        self.pool: str = o.pool
        self.namespace: str = o.namespace or ""
        self.client = Client(self.id, o.conf, self.user, o.keyring, self.pool, self.namespace,
                             self.timeout, self._lock, self._on_new_client)
        self.facts = Facts(self.id, self.client, o.stat_ttl, self._lock)
        self.reader = Reader(self.id, self.client, self._lock)
        self.replacer = Replacer(self.id, self.client, self.timeout, self.facts.forget)

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        if not options.get("pool"):
            raise OptionError("pool", "a pool name")
        user = options.get("user")
        if user is not None and (not user or user == "client."):
            raise OptionError("user", "a cephx client id such as \"glance\"")
        if options.get("glance_layout") and options.get("namespace"):
            raise OptionError("glance_layout", "false when namespace is set: Glance's rbd:// "
                                               "locations cannot name an RBD namespace")

    # ------------------------------------------------------------------ connection
    def open(self) -> None:
        self.client.open()
        log.info("store %s: connected to cluster %s, pool %s%s", self.id, self.client.fsid,
                 self.pool, f", namespace {self.namespace}" if self.namespace else "")

    def _on_new_client(self) -> list[Any]:
        """A blocklisted client was replaced (under the lock): what it opened is of no use."""
        idle = self.reader.doom_all()
        self.facts.clear()
        return idle

    def close(self) -> None:
        """Close read handles (waiting, bounded, for reads in flight), then the clients."""
        with self.client.conn_lock:
            self.client.closed = True
            self.reader.close(self.client.take_clients)

    # ------------------------------------------------------------------ reading
    def list(self) -> Iterator[ImageInfo]:
        entries = self.client.entries()
        names: list[str] = []
        infos: dict[str, ImageInfo] = {}
        for name, image_id in entries:
            if is_hidden(name):
                continue
            try:
                check_name(name)
            except StoreError:
                continue  # an RBD name no file can have (too long): not served
            names.append(name)
            info = self.facts.cached(name, image_id)
            if info is not None:
                infos[name] = info
        todo = [n for n in names if n not in infos]
        if todo:
            # Each uncached image costs an open (a few round trips): overlap them.
            with concurrent.futures.ThreadPoolExecutor(
                    max_workers=min(LIST_WORKERS, len(todo))) as pool:
                futures = {n: pool.submit(self.facts.fresh, n) for n in todo}
                for n, fut in futures.items():
                    try:
                        infos[n] = fut.result()
                    except NotFound:
                        pass  # removed since the listing
        self.facts.keep_only(names)
        for name in names:
            if name in infos:
                yield infos[name]

    def stat(self, name: str) -> ImageInfo:
        check_name(name)
        info = self.facts.cached(name, self.client.image_id(name))
        return info if info is not None else self.facts.fresh(name)

    def read_range(self, name: str, version: str, offset: int, length: int) -> bytes:
        return self.reader.read(name, version, offset, length)

    def read_chunks(self, name: str, version: str, offset: int, length: int, chunk: int
                    ) -> Iterator[bytes]:
        yield from self.reader.read_blocks(name, version, offset, length, chunk)

    # ------------------------------------------------------------------ changes
    def upload(self, name: str, size_hint: int | None = None) -> Upload:
        self._writable()
        check_name(name)
        self.client.conn()
        return RbdUpload(self, name, size_hint)

    def rename(self, old: str, new: str) -> ImageInfo:
        self._writable()
        check_name(old)
        check_name(new)
        if old != new:
            # NotFound before anything happens
            self.replacer.publish(old, new, self.client.image_id(old))
            self.facts.forget(old)
        return self.facts.fresh(new)

    def delete(self, name: str) -> None:
        self._writable()
        check_name(name)
        self.replacer.remove(name)
        self.facts.forget(name)

    def set_meta(self, name: str, meta: Mapping[str, str], expect: str | None = None
                 ) -> ImageInfo:
        self._writable()
        check_name(name)
        image = self.client.open_image(name, read_only=False)
        try:
            if expect is not None and image.id() != expect:  # the handle pins the image
                raise Changed(f"{self.id}/{name} is no longer version {expect}")
            for key, value in user_meta(meta).items():
                image.metadata_set(META_PREFIX + key, value)
            info = self.facts.info(name, image)
        except Exception as e:
            raise self.client.err(e, f"{self.id}/{name}: set metadata") from None
        finally:
            close_image(image)
        self.facts.remember(info)
        return info

    def location(self, name: str) -> str:
        """Glance's ``rbd://fsid/pool/image/snap``, for images that have that snapshot (may
        read the image: call from a worker thread); ``Unsupported`` otherwise, since
        glance_store has no form for them (see ``layout.py``)."""
        if self.namespace:
            raise Unsupported(f"store {self.id} uses RBD namespace {self.namespace!r}, which "
                              f"Glance's rbd:// locations cannot name")
        if not self.facts.has_glance_snap(name):
            raise Unsupported(f"{self.id}/{name} has no snapshot {SNAP!r}, which is what "
                              f"Glance reads (a glance_layout store makes it at publish)")
        return glance_location(self.client.fsid, self.pool, name)

    # ------------------------------------------------------------------ housekeeping
    def cleanup_leftovers(self) -> int:
        """Remove uploads of dead writers; put back images a crash left moved aside."""
        if self.read_only:
            return 0
        return Leftovers(self).cleanup()

    def usage(self) -> tuple[int, int] | None:
        images = list(self.list())
        return len(images), sum(i.size for i in images)

    def properties(self) -> dict[str, str]:
        props = {"fsid": self.client.fsid, "pool": self.pool, "user": self.user,
                 "glance_layout": "true" if self.opts.glance_layout else "false"}
        if self.namespace:
            props["namespace"] = self.namespace
        return props
