"""Credentials: the auth options, with the environment filling the gaps as the swift CLI does.

``auth_version`` "1" is tempauth (Swift's own, and RGW's Swift API); "3" is Keystone. A config
may leave any credential out: ``ST_*`` (v1 first) and ``OS_*`` (v3 first) variables supply
it, so a host set up for the ``swift`` command works as it is. The key itself is never an
option: it comes from ``key_file`` or ``ST_KEY``/``OS_PASSWORD``.
"""

from __future__ import annotations

import os
import ssl
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from imagefs.options import OptionError
from imagefs.stores.base import BackendError
from imagefs.stores.secrets import read_secret_file

#: Keystone v3 keys and the variable each falls back on.
_V3_ENV = {"project_name": "OS_PROJECT_NAME", "user_domain_name": "OS_USER_DOMAIN_NAME",
           "project_domain_name": "OS_PROJECT_DOMAIN_NAME"}


def _env(*names: str) -> str | None:
    for n in names:
        v = os.environ.get(n)
        if v:
            return v
    return None


def _auth_version(options: Mapping[str, Any]) -> str:
    """Config, else the environment as the swift CLI reads it, else "1"."""
    v = options.get("auth_version") or _env("ST_AUTH_VERSION", "OS_AUTH_VERSION",
                                            "OS_IDENTITY_API_VERSION")
    if v is None:
        v = "3" if _env("OS_AUTH_URL") and not _env("ST_AUTH") else "1"
    return {"1.0": "1", "3.0": "3", "v3": "3"}.get(v, v)


@dataclass(frozen=True)
class Auth:
    """The auth settings in force: config first, then the environment."""

    auth_version: str
    auth_url: str | None
    user: str | None
    key_file: str | None
    #: the key from the environment, used when there is no ``key_file``
    key_env: str | None
    project_name: str | None
    user_domain_name: str | None
    project_domain_name: str | None
    region_name: str | None

    def os_options(self) -> dict[str, str]:
        """swiftclient's ``os_options``: the Keystone scope (v3), or just the region."""
        if self.auth_version == "3":
            return {k: v for k in ("project_name", "user_domain_name", "project_domain_name",
                                   "region_name") if (v := getattr(self, k))}
        return {"region_name": self.region_name} if self.region_name else {}


def resolve(options: Mapping[str, Any]) -> Auth:
    """Auth settings with the OS_* / ST_* environment filling what the config leaves out."""
    v = _auth_version(options)
    v1 = v == "1"
    return Auth(
        auth_version=v,
        auth_url=options.get("auth_url") or (_env("ST_AUTH", "OS_AUTH_URL") if v1
                                             else _env("OS_AUTH_URL", "ST_AUTH")),
        user=options.get("user") or (_env("ST_USER", "OS_USERNAME") if v1
                                     else _env("OS_USERNAME", "ST_USER")),
        key_file=options.get("key_file"),
        key_env=_env("ST_KEY", "OS_PASSWORD") if v1 else _env("OS_PASSWORD", "ST_KEY"),
        project_name=options.get("project_name") or _env("OS_PROJECT_NAME", "OS_TENANT_NAME"),
        user_domain_name=options.get("user_domain_name") or _env("OS_USER_DOMAIN_NAME"),
        project_domain_name=(options.get("project_domain_name")
                             or _env("OS_PROJECT_DOMAIN_NAME")),
        region_name=options.get("region_name") or _env("OS_REGION_NAME"),
    )


def check(options: Mapping[str, Any]) -> None:
    """The config loader's checks of the auth keys (raise ``OptionError``)."""
    a = resolve(options)
    if a.auth_version not in ("1", "3"):
        raise OptionError("auth_version", f'expected "1" or "3" (the environment says '
                                          f'{a.auth_version!r})')
    url = a.auth_url
    if not url:
        raise OptionError("auth_url", "expected the auth URL (or ST_AUTH / OS_AUTH_URL in "
                                      "the environment)")
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise OptionError("auth_url", f"expected an http:// or https:// URL, got {url!r}")
    if parsed.username or parsed.password:
        raise OptionError("auth_url", "expected a URL without credentials (use key_file)")
    if not a.user:
        raise OptionError("user", "expected a user name (or ST_USER / OS_USERNAME in the "
                                  "environment)")
    if not a.key_file and not a.key_env:
        raise OptionError("key_file", "expected a file holding the key (or ST_KEY / "
                                      "OS_PASSWORD in the environment)")
    if a.auth_version == "3":
        for k, env in _V3_ENV.items():
            if not getattr(a, k):
                raise OptionError(k, f'expected a value with auth_version = "3" (or {env} '
                                     f"in the environment)")


def read_key(store_id: str, a: Auth) -> str | None:
    """The key: ``key_file``'s content, else the environment's."""
    if not a.key_file:
        return a.key_env
    return read_secret_file(store_id, "key_file", a.key_file)


def tls_context(store_id: str, cacert: str | None, insecure: bool) -> ssl.SSLContext:
    """The TLS settings of the hand-made segment PUTs, as swiftclient applies them."""
    try:
        ctx = ssl.create_default_context(cafile=cacert)
    except (OSError, ssl.SSLError) as e:
        raise BackendError(f"store {store_id}: cacert {cacert}: {e}") from None
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
