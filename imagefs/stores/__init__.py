"""Registry of store types: type name → class, and building stores from config.

Modules are imported on demand; they import their backend libraries lazily too, so validating a
config never needs boto3, rados or swiftclient to be importable.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from imagefs.options import Option, StoreConfig
    from imagefs.stores.base import Store

_TYPES: dict[str, str] = {
    "file": "imagefs.stores.file:FileStore",
    "http": "imagefs.stores.http:HttpStore",
    "s3": "imagefs.stores.s3:S3Store",
    "rbd": "imagefs.stores.rbd:RbdStore",
    "swift": "imagefs.stores.swift:SwiftStore",
    "cinder": "imagefs.stores.cinder:CinderStore",
}


def store_types() -> list[str]:
    """Type names a config may use, in a stable order."""
    return list(_TYPES)


def store_class(type_name: str) -> type[Store]:
    module, _, cls = _TYPES[type_name].partition(":")
    return getattr(importlib.import_module(module), cls)


def option_specs(type_name: str) -> Mapping[str, Option]:
    """The type-specific config keys (``imagefs.options.Option`` values)."""
    return store_class(type_name).OPTIONS


def build(cfg: StoreConfig) -> Store:
    """Instantiate (not yet open) the store a config table describes."""
    return store_class(cfg.type)(cfg)
