"""``type = "http"``: a read-only mirror reached with ranged GETs.

Images are listed from the server's JSON directory index (nginx ``autoindex_format json``) or
given explicitly with ``images = [...]``. An image's version is its size and Last-Modified
time; every ranged GET carries ``If-Unmodified-Since`` and its ``Content-Range`` and length are
checked, so a replaced file yields ``Changed`` (EIO), never a mix of two files.
"""

from __future__ import annotations

import email.utils
import json
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from imagefs.options import StoreConfig, option
from imagefs.stores.base import (
    DEFAULT_MODE,
    BackendError,
    Changed,
    ImageInfo,
    InvalidName,
    NotFound,
    OptionError,
    ReadOnly,
    Store,
    Upload,
    check_name,
)
from imagefs.stores.ranges import check_reply, http_date


@dataclass(frozen=True)
class HttpOptions:
    url: str = option("str", required=True, help="base URL ending in '/'")
    images: tuple[str, ...] | None = option("list", default=None,
                                            help="image names; default: the JSON index")
    retries: int = option("int", default=3)


class HttpStore(Store):
    type_name = "http"
    Options = HttpOptions
    default_concurrency = 8

    def __init__(self, cfg: StoreConfig) -> None:
        super().__init__(cfg)
        url = self.opts.url
        self.url = url if url.endswith("/") else url + "/"
        self.read_only = True
        self._pool: Any = None

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        parsed = urllib.parse.urlsplit(options["url"])
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise OptionError("url", f"expected an http:// or https:// URL, got {options['url']!r}")
        if parsed.username or parsed.password:
            raise OptionError("url", "expected a URL without credentials")

    def open(self) -> None:
        import urllib3  # lazy: validating a config must not need it

        self._urllib3 = urllib3
        self._pool = urllib3.PoolManager(
            maxsize=max(self.cfg.concurrency or self.default_concurrency, 1),
            timeout=urllib3.Timeout(connect=min(10.0, self.timeout), read=self.timeout),
            retries=urllib3.Retry(total=self.opts.retries, backoff_factor=0.2,
                                  status_forcelist=(500, 502, 503, 504),
                                  allowed_methods=frozenset({"GET", "HEAD"}),
                                  raise_on_status=False, redirect=3),
        )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.clear()

    def _image_url(self, name: str) -> str:
        return self.url + urllib.parse.quote(name, safe="")

    def _request(self, method: str, url: str, headers: Mapping[str, str] | None = None,
                 preload: bool = True) -> Any:
        if self._pool is None:
            self.open()
        try:
            return self._pool.request(method, url, headers=dict(headers or {}),
                                      preload_content=preload)
        except self._urllib3.exceptions.HTTPError as e:
            raise BackendError(f"store {self.id}: {method} {url}: {e}") from None

    def _info_from_headers(self, name: str, headers: Mapping[str, str]) -> ImageInfo:
        try:
            size = int(headers["Content-Length"])
        except (KeyError, ValueError):
            raise BackendError(f"store {self.id}: {name}: no usable Content-Length") from None
        mtime = http_date(headers.get("Last-Modified"))
        return ImageInfo(name=name, size=size, mtime=mtime, mode=DEFAULT_MODE,
                         version=f"{size}:{int(mtime)}")

    def list(self) -> Iterator[ImageInfo]:
        names = self.opts.images
        if names is not None:
            for name in names:
                try:
                    yield self.stat(name)
                except NotFound:
                    continue
            return
        r = self._request("GET", self.url, {"Accept": "application/json"})
        if r.status != 200:
            raise BackendError(f"store {self.id}: listing {self.url}: HTTP {r.status}")
        try:
            entries = json.loads(r.data)
        except ValueError:
            raise BackendError(f"store {self.id}: {self.url} is not a JSON index; set "
                               f"'images = [...]' in the store's config") from None
        for e in entries:
            if not isinstance(e, dict) or e.get("type") != "file":
                continue
            name = e.get("name", "")
            try:
                check_name(name)
            except InvalidName:
                continue
            size = int(e.get("size", 0))
            mtime = http_date(e.get("mtime"))
            yield ImageInfo(name=name, size=size, mtime=mtime, mode=DEFAULT_MODE,
                            version=f"{size}:{int(mtime)}")

    def stat(self, name: str) -> ImageInfo:
        check_name(name)
        r = self._request("HEAD", self._image_url(name))
        if r.status == 404:
            raise NotFound(f"{self.id}/{name}")
        if r.status != 200:
            raise BackendError(f"store {self.id}: HEAD {name}: HTTP {r.status}")
        return self._info_from_headers(name, r.headers)

    def read_range(self, name: str, version: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        size_s, _, mtime_s = version.partition(":")
        headers = {"Range": f"bytes={offset}-{offset + length - 1}",
                   "Accept-Encoding": "identity"}
        if mtime_s and int(mtime_s) > 0:
            headers["If-Unmodified-Since"] = email.utils.formatdate(int(mtime_s), usegmt=True)
        # Streamed: status and Content-Range are checked before any body is read, so a server
        # that ignores Range (200 with the whole image) costs one connection, not the image
        # in memory.
        r = self._request("GET", self._image_url(name), headers, preload=False)
        try:
            return self._ranged_body(r, name, offset, length, size_s)
        finally:
            if r.status == 206 and r.isclosed():
                r.release_conn()
            else:
                r.close()

    def _ranged_body(self, r: Any, name: str, offset: int, length: int, size_s: str) -> bytes:
        if r.status == 404:
            raise NotFound(f"{self.id}/{name}")
        if r.status == 412:
            raise Changed(f"{self.id}/{name} changed on the server since it was opened")
        what = f"store {self.id}: GET {name}"
        declared = r.headers.get("Content-Length", "")
        reply = check_reply(what, r.status, r.headers.get("Content-Range"),
                            int(declared) if declared.isdigit() else None, offset, length)
        if reply.total is not None and size_s and reply.total != int(size_s):
            raise Changed(f"{self.id}/{name}: size changed on the server since it was opened")
        if not reply.length:
            return b""
        try:
            data = r.read(reply.length + 1)
        except self._urllib3.exceptions.HTTPError as e:
            raise BackendError(f"{what}: {e}") from None
        if len(data) != reply.length:
            raise BackendError(f"{what}: got {len(data)} bytes, the reply says {reply.length}")
        return data

    def _refuse(self, *_: Any) -> Any:
        raise ReadOnly(f"store {self.id} is an http mirror (read-only)")

    def upload(self, name: str, size_hint: int | None = None) -> Upload:
        return self._refuse()

    def rename(self, old: str, new: str) -> ImageInfo:
        return self._refuse()

    def delete(self, name: str) -> None:
        self._refuse()

    def set_meta(self, name: str, meta: Mapping[str, str], expect: str | None = None
                 ) -> ImageInfo:
        return self._refuse()

    def location(self, name: str) -> str:
        return self._image_url(name)

    def properties(self) -> dict[str, str]:
        return {"url": self.url}


