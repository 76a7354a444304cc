"""Where Glance finds an S3 image: its location forms, with and without credentials.

``location`` is Glance's s3:// form without credentials; ``glance_location`` adds them
(``s3://ACCESS:SECRET@host/bucket/key``, all glance_store's S3 driver reads from) and is served
to root only. Keys glance_store cannot name (with '/' or '@') have neither.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from imagefs.stores.base import Unsupported, glance_literal
from imagefs.stores.s3.client import read_secret

if TYPE_CHECKING:
    from imagefs.stores.s3.store import S3Store


def _base(store: S3Store) -> str:
    """``scheme://host`` as glance_store's S3 driver writes it: ``s3+https`` for an https
    endpoint, ``s3`` for any other (it says ``s3://`` of http hosts too, and connects to
    its own ``s3_store_host`` whatever the location says); AWS: ``s3.amazonaws.com``."""
    url = store.opts.endpoint_url
    if not url:
        return "s3+https://s3.amazonaws.com"
    parts = urlsplit(url)
    scheme = "s3+https" if parts.scheme == "https" else "s3"
    return f"{scheme}://{parts.netloc.rsplit('@', 1)[-1]}{parts.path.rstrip('/')}"


def _path(store: S3Store, name: str) -> str:
    """``bucket/key``, verbatim as glance_store reads it: it takes the last two parts of
    the path for bucket and key and decodes nothing, so a key with '/' (a prefix such as
    "glance/images/") or '@' has no Glance location (``Unsupported``)."""
    return f"{store.bucket}/{glance_literal(store.key(name), 'S3 key', also='@')}"


def location(store: S3Store, name: str) -> str:
    """Glance's S3 location without its credentials: ``s3://host/bucket/key``. Enough to
    say where the image is; glance_store itself can read only ``glance_location``."""
    return f"{_base(store)}/{_path(store, name)}"


def glance_location(store: S3Store, name: str) -> str:
    """``s3://ACCESS:SECRET@host/bucket/key``, the location glance_store 4.1 writes and
    reads: its driver takes credentials only from the location. Root only (see
    ``Store.glance_location``); credentials as this store uses them (``access_key_id`` and
    its secret file, else the profile or AWS environment boto3 resolves)."""
    access, secret = _credentials(store)
    for what, value, bad in (("access key id", access, ":@/?#"),
                             ("secret access key", secret, ":@?#")):
        if not value or any(c in value for c in bad) or \
                any(ord(c) < 0x21 or ord(c) == 0x7f for c in value):
            raise Unsupported(f"store {store.id}: the {what} cannot be written in a Glance "
                              f"location (glance_store splits it at ':', '@', '?', '#')")
    scheme, host = _base(store).split("://", 1)
    return f"{scheme}://{access}:{secret}@{host}/{_path(store, name)}"


def _credentials(store: S3Store) -> tuple[str, str]:
    """The key pair this store signs with, read afresh (the secret is kept nowhere)."""
    if store.opts.access_key_id:
        return store.opts.access_key_id, read_secret(store.id, store.opts) or ""
    import boto3

    creds = boto3.session.Session(profile_name=store.opts.profile).get_credentials()
    if creds is None:
        raise Unsupported(f"store {store.id}: no credentials to write in a Glance location")
    frozen = creds.get_frozen_credentials()
    if frozen.token:
        raise Unsupported(f"store {store.id}: temporary credentials (a session token) "
                          f"cannot be written in a Glance location")
    return frozen.access_key, frozen.secret_key

