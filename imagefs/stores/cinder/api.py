"""Cinder's block-storage API (v3) as plain REST with ``requests``, Keystone v3 auth included.

Why not python-cinderclient or keystoneauth1: they are Debian's, outside the project's venv
(which sees only the Ceph bindings of Debian's Python), and with them comes osprofiler, which
imports eventlet; eventlet imported in a worker thread leaves the thread unjoinable. The store
needs a handful of calls, each at the microversion it requires (attachments with a mode 3.54,
attachment complete 3.44, extend of an attached volume 3.42), and must tell "in use" from "not
found" from "out of quota" in every answer: explicit requests keep that visible.

Auth
    ``noauth`` (Cinder's test mode): the token is ``USER_ID:PROJECT_ID`` and the URL
    ``<endpoint>/<project_id>``, exactly what glance_store's ``cinder_endpoint_template`` builds.
    ``keystone``: a password-method token from ``<auth_url>/auth/tokens`` scoped to the project;
    the volume endpoint is the catalog's ``block-storage`` (or ``volumev3``) entry for the
    configured interface and region, unless ``endpoint`` overrides it. The token is renewed
    five minutes before it expires, and once when Cinder answers 401.

Every request is bounded by the store's timeout; connection failures (the request never
reached Cinder) are retried twice, nothing else is retried here.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import urlencode

from imagefs.stores.base import (
    BackendError,
    Busy,
    NoSpace,
    NotFound,
    ReadOnly,
    StoreError,
)

log = logging.getLogger(__name__)

#: Microversions: the least each call needs, so an older Cinder answers what it can.
MV_BASE = "3.0"
MV_ATTACH = "3.54"  # attachments with "mode" (rw/ro)
MV_COMPLETE = "3.44"  # attachment "os-complete": the volume becomes in-use
MV_ATTACHMENTS = "3.27"  # the attachments API itself (delete)
MV_EXTEND_ATTACHED = "3.42"  # os-extend while in-use
#: Volumes asked for per listing page (Cinder's osapi_max_limit defaults to 1000).
PAGE = 1000
#: Catalog service types of Cinder's v3 API, preferred first.
SERVICE_TYPES = ("block-storage", "volumev3")
#: Renew a Keystone token this long before it expires.
RENEW_BEFORE = 300.0


class ApiError(BackendError):
    """A Cinder answer other than success: ``status`` and Cinder's own message."""

    def __init__(self, status: int, message: str, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.message = message


def message(body: Any) -> str:
    """Cinder's error text: ``{"badRequest": {"message": ...}}`` and its relatives."""
    if isinstance(body, dict):
        for value in body.values():
            if isinstance(value, dict) and "message" in value:
                return str(value["message"])
    return str(body)[:300]


def error_for(status: int, msg: str, what: str) -> StoreError:
    """HTTP status → the store error ``imagefs.errors`` maps to errno (400s are the caller's
    to judge)."""
    text = f"{what}: HTTP {status}: {msg}"
    if status == 404:
        return NotFound(text)
    if status == 413:  # OverLimit: quota (volumes, gigabytes)
        return NoSpace(text)
    if status == 409:
        return Busy(text)
    if status == 403:
        return ReadOnly(text)
    return ApiError(status, msg, text)


def _expiry(text: Any) -> float:
    try:
        dt = datetime.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return time.time() + 3600
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.UTC)
    return dt.timestamp()


class CinderApi:
    """One project's volume API; thread-safe (requests' connection pool, a lock for auth)."""

    def __init__(self, store_id: str, options: Mapping[str, Any], timeout: float,
                 password: Callable[[], str]) -> None:
        self.store_id = store_id
        self.o = options
        self.timeout = timeout
        self._password = password
        self.http: Any = None
        self.url = ""  # the project's volume API, without a trailing slash
        self._token = ""
        self._expires = 0.0
        self._auth_lock = threading.Lock()

    def open(self) -> None:
        """Build the HTTP session and, with Keystone, get a token and the endpoint."""
        import requests
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        http = requests.Session()
        retry = Retry(total=2, connect=2, read=0, status=0, other=0, redirect=0)
        for scheme in ("http://", "https://"):
            http.mount(scheme, HTTPAdapter(pool_connections=4, pool_maxsize=32, max_retries=retry))
        http.verify = self.o.get("cacert") or not self.o.get("insecure")
        self.http = http
        o = self.o
        if o["auth"] == "noauth":
            url = o["endpoint"].rstrip("/")
            if not url.endswith("/" + o["project_id"]):
                url = f"{url}/{o['project_id']}"
            self.url = url
            self._token = f"{o['user_id']}:{o['project_id']}"
            self._expires = float("inf")
            return
        self._authenticate()

    def close(self) -> None:
        if self.http is not None:
            self.http.close()
        self.http = None

    # -- Keystone ---------------------------------------------------------------------------

    def _authenticate(self) -> None:
        """A new project-scoped token (and the volume endpoint from its catalog)."""
        o = self.o
        base = o["auth_url"].rstrip("/")
        if not base.endswith("/v3"):
            base += "/v3"
        if o.get("project_id"):
            project: dict[str, Any] = {"id": o["project_id"]}
        else:
            project = {"name": o["project"], "domain": {"name": o["project_domain"]}}
        body = {"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": o["user"], "domain": {"name": o["user_domain"]},
                "password": self._password()}}},
            "scope": {"project": project}}}
        what = f"store {self.store_id}: Keystone {base}"
        try:
            resp = self.http.post(f"{base}/auth/tokens", json=body, timeout=self.timeout)
        except Exception as e:
            raise BackendError(f"{what}: {type(e).__name__}: {e}") from None
        if resp.status_code != 201:
            raise BackendError(f"{what}: authentication failed: HTTP {resp.status_code} "
                               f"{message(_json(resp))}")
        token = (_json(resp) or {}).get("token") or {}
        url = o.get("endpoint") or self._catalog_url(token.get("catalog") or [], what)
        self.url = url.rstrip("/")
        self._token = resp.headers.get("X-Subject-Token", "")
        self._expires = _expiry(token.get("expires_at"))

    def _catalog_url(self, catalog: list[dict[str, Any]], what: str) -> str:
        region, interface = self.o.get("region") or "", self.o["interface"]
        for stype in SERVICE_TYPES:
            for service in catalog:
                if service.get("type") != stype:
                    continue
                for ep in service.get("endpoints") or []:
                    if ep.get("interface") != interface:
                        continue
                    if region and region not in (ep.get("region"), ep.get("region_id")):
                        continue
                    return str(ep["url"])
        raise BackendError(f"{what}: no {interface} block-storage endpoint"
                           f"{' in region ' + region if region else ''} in the catalog "
                           "(set endpoint to give it)")

    def _auth_token(self, renew: bool = False) -> str:
        with self._auth_lock:
            if renew or time.time() > self._expires - RENEW_BEFORE:
                self._authenticate()
            return self._token

    # -- requests ---------------------------------------------------------------------------

    def call(self, method: str, path: str, mv: str = MV_BASE, body: Any = None,
             what: str = "") -> tuple[int, Any]:
        """One request; (status, JSON body or None). Only transport failures raise here."""
        if self.http is None:
            raise BackendError(f"store {self.store_id} is not connected")
        what = what or f"{method} {path}"
        renewed = False
        while True:
            headers = {"X-Auth-Token": self._auth_token(), "Accept": "application/json",
                       "OpenStack-API-Version": f"volume {mv}"}
            try:
                resp = self.http.request(method, self.url + path, json=body, headers=headers,
                                         timeout=self.timeout)
            except Exception as e:  # connection refused/reset, timeouts
                raise BackendError(
                    f"store {self.store_id}: {what}: {type(e).__name__}: {e}") from None
            if resp.status_code == 401 and self.o["auth"] == "keystone" and not renewed:
                renewed = True
                self._auth_token(renew=True)
                continue
            return resp.status_code, _json(resp)

    def request(self, method: str, path: str, mv: str = MV_BASE, body: Any = None,
                what: str = "", ok: tuple[int, ...] = (200, 202, 204)) -> Any:
        """One request that must succeed; any other status raises (see ``error_for``)."""
        status, data = self.call(method, path, mv, body, what)
        if status not in ok:
            raise error_for(status, message(data),
                            f"store {self.store_id}: {what or method + ' ' + path}")
        return data

    # -- volumes ----------------------------------------------------------------------------

    def volume(self, vid: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/volumes/{vid}", what=f"volume {vid}")["volume"])

    def volumes(self, **filters: str) -> Iterator[dict[str, Any]]:
        """Every volume of the project matching ``filters`` (Cinder's exact-match query
        filters, e.g. ``name``), page by page."""
        marker = None
        while True:
            q = {"limit": str(PAGE), **filters}
            if marker:
                q["marker"] = marker
            page = self.request("GET", "/volumes/detail?" + urlencode(q),
                                what="listing volumes")["volumes"]
            yield from page
            if len(page) < PAGE:
                return
            marker = page[-1]["id"]

    def wait_volume(self, vid: str, until: Callable[[dict[str, Any]], bool], what: str,
                    deadline: float) -> dict[str, Any]:
        """Poll a volume until ``until(volume)``; an ``error*`` status or the deadline raise."""
        delay = 0.05
        while True:
            v = self.volume(vid)
            if until(v):
                return v
            status = str(v.get("status"))
            if status.startswith("error"):
                err = NoSpace if status == "error_extending" else BackendError
                raise err(f"store {self.store_id}: volume {vid} went to status {status} "
                          f"while {what}")
            if time.monotonic() > deadline:
                raise BackendError(f"store {self.store_id}: volume {vid} still {status} after "
                                   f"waiting for it to finish {what}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)


def _json(resp: Any) -> Any:
    try:
        return resp.json() if resp.content else None
    except ValueError:
        return {"raw": resp.text[:300]}
