"""Reading a credential from the file the config names (``*_file`` keys), one way for every
store: read when needed and kept nowhere else, whitespace stripped, an empty file refused, and
errors that name the store, the key and the file, never the secret."""

from __future__ import annotations

from imagefs.stores.base import BackendError


def read_secret_file(store_id: str, key: str, path: str) -> str:
    """The secret in ``path`` (config key ``key``); ``BackendError`` if it cannot be read or
    is empty."""
    try:
        with open(path, encoding="utf-8") as f:
            secret = f.read().strip()
    except OSError as e:
        raise BackendError(f"store {store_id}: cannot read {key} {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise BackendError(f"store {store_id}: {key} {path} is not UTF-8 text") from None
    if not secret:
        raise BackendError(f"store {store_id}: {key} {path} is empty")
    return secret
