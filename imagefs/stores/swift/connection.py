"""Connections to one Swift account: one swiftclient Connection per thread, one token shared.

swiftclient's ``Connection`` is not thread-safe, so every thread (the bridge's workers, the
store's pool, upload threads) gets its own; they all start from the storage URL and token the
last (re)authentication gave, so a mount authenticates once, not once per thread. Every
request goes through ``call``, which maps swiftclient's errors to the store's exceptions in one
place (``status`` on the exception is the HTTP status). The store's worker pool (parallel
HEADs and DELETEs) lives here too: its threads are connections' users like any other.
"""

from __future__ import annotations

import concurrent.futures
import logging
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from imagefs.stores.base import BackendError, Changed, NoSpace, NotFound, ReadOnly, StoreError
from imagefs.stores.swift.auth import Auth, read_key, tls_context

log = logging.getLogger(__name__)

LIST_PAGE = 1000
_T = TypeVar("_T")


class Connections:
    """Per-thread swiftclient Connections sharing one token, and the store's worker pool."""

    def __init__(self, store_id: str, auth: Auth, *, retries: int, timeout: float,
                 cacert: str | None, insecure: bool, concurrency: int) -> None:
        self.store_id = store_id
        self.auth = auth
        self.retries = retries
        self.timeout = timeout
        self.cacert = cacert
        self.insecure = insecure
        self.concurrency = concurrency
        self.key: str | None = None
        self.url: str | None = None
        self.token: str | None = None
        #: TLS for the hand-made segment PUTs (``segments.py``), as swiftclient's
        self.ssl: ssl.SSLContext | None = None
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._lock = threading.Lock()
        #: every Connection made (one per thread), closed by close()
        self.conns: list[Any] = []
        self._sc: Any = None
        self.ClientException: type[Exception] = Exception
        _import_client_here()

    def open(self) -> None:
        import swiftclient.client  # lazy: validating a config must not need it

        self._sc = swiftclient.client
        self.ClientException = swiftclient.client.ClientException
        # swiftclient's request log may show a prefix of tokens and keys: show none
        swiftclient.client.logger_settings["reveal_sensitive_prefix"] = 0
        self.key = read_key(self.store_id, self.auth)
        self.ssl = tls_context(self.store_id, self.cacert, self.insecure)
        self.pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, self.concurrency), thread_name_prefix=f"swift-{self.store_id}")

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False)
            self.pool = None
        with self._lock:
            conns, self.conns = self.conns, []
        for conn in conns:
            try:
                conn.close()
            except Exception as e:  # closing must not fail the unmount
                log.debug("store %s: closing a connection: %s", self.store_id, e)
        self._local = threading.local()

    def conn(self) -> Any:
        """This thread's swiftclient Connection (they are not thread-safe), sharing one token."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self._sc is None:
            raise BackendError(f"store {self.store_id}: not opened")
        a = self.auth
        conn = self._sc.Connection(
            authurl=a.auth_url, user=a.user, key=self.key,
            auth_version=a.auth_version, os_options=a.os_options(),
            preauthurl=self.url, preauthtoken=self.token,
            retries=self.retries, starting_backoff=0.25, max_backoff=4,
            timeout=self.timeout, retry_on_ratelimit=True,
            cacert=self.cacert, insecure=self.insecure)
        self._local.conn = conn
        with self._lock:
            self.conns.append(conn)
        return conn

    def invoke(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``Connection.<method>`` of this thread; swiftclient's exceptions pass through."""
        conn = self.conn()
        try:
            return getattr(conn, method)(*args, **kwargs)
        finally:
            if conn.token and conn.token != self.token:  # (re)authenticated: share it
                self.url, self.token = conn.url, conn.token

    def call(self, what: str, method: str, *args: Any, write: bool = False,
             **kwargs: Any) -> Any:
        """Like ``invoke``, with errors mapped to the store's exceptions."""
        try:
            return self.invoke(method, *args, **kwargs)
        except self.ClientException as e:
            raise self.error(e, what, write) from None
        except OSError as e:  # sockets; requests' exceptions are OSErrors too
            raise self.socket_error(what, e) from None

    def socket_error(self, what: str, e: BaseException) -> BackendError:
        return BackendError(f"store {self.store_id}: {what}: {type(e).__name__}: {e}")

    def error(self, e: Any, what: str, write: bool) -> StoreError:
        """The store's exception for a swiftclient one; its ``status`` is the HTTP status."""
        err = self._error_of(e, what, write)
        err.status = getattr(e, "http_status", None)  # type: ignore[attr-defined]
        return err

    def _error_of(self, e: Any, what: str, write: bool) -> StoreError:
        status = getattr(e, "http_status", None)
        if status is None:
            return BackendError(f"store {self.store_id}: {what}: {e}")
        msg = (f"store {self.store_id}: {what}: HTTP {status} "
               f"{getattr(e, 'http_reason', '') or ''}").rstrip()
        if status == 404:
            return NotFound(msg)
        if status == 412:
            return Changed(msg)
        if status == 401:
            return BackendError(msg + " (authentication failed: check user and key)")
        if status == 403:
            return ReadOnly(msg) if write else BackendError(msg)
        if status in (413, 507):
            return NoSpace(msg)
        return BackendError(msg)

    def reauthenticate(self) -> None:
        conn = self.conn()
        try:
            conn.url = conn.token = None
            self.url, self.token = conn.get_auth()
        except Exception as e:
            log.warning("store %s: re-authentication failed: %s", self.store_id, e)

    # ------------------------------------------------------------------ helpers
    def iter_container(self, container: str, prefix: str | None = None
                       ) -> Iterator[list[dict[str, Any]]]:
        """Listing pages, following markers: memory stays at one page."""
        marker = ""
        while True:
            _, page = self.call(f"container {container}: GET", "get_container", container,
                                marker=marker, limit=LIST_PAGE, prefix=prefix)
            if not page:
                return
            yield page
            marker = page[-1].get("name") or page[-1].get("subdir", "")

    def delete_quietly(self, container: str, obj: str) -> bool:
        """DELETE ``obj``; False (logged) if it was not there or the DELETE failed."""
        return self.gone(container, obj) > 0

    def gone(self, container: str, obj: str) -> int:
        """DELETE ``obj``: 1 if deleted, 0 if it was not there, -1 if the DELETE failed."""
        try:
            self.call(f"{container}/{obj}: DELETE", "delete_object", container, obj, write=True)
        except NotFound:
            return 0
        except StoreError as e:
            log.warning("store %s: %s", self.store_id, e)
            return -1
        return 1

    def map(self, fn: Callable[[str], _T], items: Iterable[str]) -> list[_T]:
        """``fn`` of every item, in the pool when there is more than one."""
        todo = list(items)
        if self.pool is not None and len(todo) > 1:
            return list(self.pool.map(fn, todo))
        return [fn(o) for o in todo]


def _import_client_here() -> None:
    """Import swiftclient in the thread that builds the store (the daemon's main thread), not
    in the worker thread that opens it. With the OpenStack libraries installed beside it
    (Debian's glance_store, cinder) swiftclient pulls in keystoneauth1, osprofiler,
    oslo.concurrency and so eventlet; eventlet 0.33 first imported in a non-main thread makes
    that thread impossible to join on Python 3.11, and the mount hung in ``open_stores``.
    Best effort: a missing swiftclient is reported by ``open()``."""
    try:
        import swiftclient.client  # noqa: F401
    except ImportError:
        pass
