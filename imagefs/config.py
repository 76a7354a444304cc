"""TOML configuration → frozen, validated settings.

Every error names the file, the key and what was expected, because the person reading it is an
operator with a config file open, not a Python programmer. ``ConfigError`` carries that text;
the CLI prints it and exits 2.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagefs import hashing
from imagefs.options import (  # noqa: F401  (re-exported: the config's vocabulary)
    Option,
    OptionError,
    StoreConfig,
    convert,
    expect,
    parse_size,
)
from imagefs.stores import option_specs, store_class, store_types

STORE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
RESERVED_ID_PREFIX = "os_glance_"
#: Names the mount root uses itself, so no store may take them.
RESERVED_IDS = frozenset({"default"})

class ConfigError(Exception):
    """A configuration problem, phrased for the person who wrote the file."""


@dataclass(frozen=True)
class CacheConfig:
    """Bounds for every buffer imagefs keeps (doc/SEMANTICS.md, "Memory")."""

    dir: Path
    disk_size: int
    memory_size: int
    block_size: int
    readahead: int
    max_prefetch_memory: int
    #: Most bytes one backend read request fetches (a run of blocks, see reader.py).
    fetch_size: int = 16 << 20
    #: Readers use the kernel page cache (fast re-reads of an unchanged image while it stays
    #: cached) instead of direct I/O (the default: sequential reads 1.3-1.5x faster here,
    #: see imagefs.toml(5)).
    page_cache: bool = False
    #: Past this many bytes streamed in order, a spooled upload drops what it has sent from
    #: its local spool (0: never), so copying a huge image to S3/Swift needs no disk for it.
    spool_trim_after: int = 1 << 30
    #: Bytes written to random-write stores (file, rbd, cinder) that may be queued at once,
    #: all writers together, so the store write and the hashing overlap (0: write through).
    max_write_behind: int = 16 << 20


@dataclass(frozen=True)
class HashConfig:
    algo: str = "sha512"
    #: Hashing a close may do beyond what streamed through in order (see writer_direct.py).
    inline_max: int = 64 << 20
    #: Largest image hashed in the background after a close that left it unhashed.
    background_max: int = 64 << 30


@dataclass(frozen=True)
class Config:
    path: Path
    cache: CacheConfig
    hash: HashConfig
    stores: tuple[StoreConfig, ...]
    metadata_ttl: float = 2.0
    #: Seconds SIGTERM/SIGINT waits for requests in flight (uploads being published) before
    #: they are aborted; a second signal aborts at once. Nothing partial is ever published.
    stop_timeout: float = 30.0
    #: (host, port) of the Prometheus metrics endpoint; None: no endpoint (the default).
    metrics: tuple[str, int] | None = None
    #: Least severe log messages written (``-o debug`` overrides it).
    log_level: str = "info"
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def default_store(self) -> StoreConfig | None:
        return next((s for s in self.stores if s.default), None)


_COMMON_STORE_KEYS: dict[str, Option] = {
    "type": Option("str", required=True),
    "description": Option("str", default=""),
    "default": Option("bool", default=False),
    "read_only": Option("bool", default=False),
    "weight": Option("int", default=0),
    "timeout": Option("float", default=60.0),
    "concurrency": Option("int", default=0),
    "chown": Option(("refuse", "ignore", "keep"), default="refuse"),
    "allow_readable_secret_file": Option("bool", default=False),
}

_CACHE_KEYS: dict[str, Option] = {
    "dir": Option("path"),
    "disk_size": Option("size", default=20 << 30),
    "memory_size": Option("size", default=64 << 20),
    "block_size": Option("size", default=1 << 20),
    "readahead": Option("size", default=64 << 20),
    "max_prefetch_memory": Option("size", default=64 << 20),
    "fetch_size": Option("size", default=16 << 20),
    "page_cache": Option("bool", default=False),
    "spool_trim_after": Option("size", default=1 << 30),
    "max_write_behind": Option("size", default=16 << 20),
}

LOG_LEVELS = ("debug", "info", "warning", "error")

#: The tables and keys of the file's top level.
TOP_KEYS = frozenset({"cache", "hash", "mount", "stores", "metadata_ttl"})

_HASH_KEYS: dict[str, Option] = {
    "algo": Option(hashing.ALGOS, default="sha512"),
    "inline_max": Option("size", default=HashConfig.inline_max),
    "background_max": Option("size", default=HashConfig.background_max),
}

_MOUNT_KEYS: dict[str, Option] = {
    "stop_timeout": Option("seconds", default=30.0),
    "metrics": Option("str", default=None),
    "log_level": Option(LOG_LEVELS, default="info"),
}

_ADDRESS = re.compile(r"^(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9.-]+)):(\d{1,5})$")


def parse_address(text: str) -> tuple[str, int]:
    """'127.0.0.1:9488' or '[::1]:9488' → (host, port). Raises ValueError with the form."""
    m = _ADDRESS.match(text)
    if not m or not 0 < int(m.group(3)) < 65536:
        raise ValueError('an address like "127.0.0.1:9488" or "[::1]:9488" (port 1-65535)')
    return m.group(1) or m.group(2), int(m.group(3))


def default_cache_dir() -> Path:
    """/var/cache/imagefs as root, else $XDG_CACHE_HOME/imagefs (or ~/.cache/imagefs)."""
    if os.geteuid() == 0:
        return Path("/var/cache/imagefs")
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(xdg) / "imagefs"


class _Checker:
    """Validates one table; every message names the file and the dotted key."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, expected: str) -> ConfigError:
        return ConfigError(f"{self.path}: {key}: {expected}")

    def table(self, prefix: str, table: Any, spec: Mapping[str, Option]) -> dict[str, Any]:
        if not isinstance(table, dict):
            raise self.fail(prefix, "expected a table")
        unknown = sorted(set(table) - set(spec))
        if unknown:
            known = ", ".join(sorted(spec))
            raise self.fail(f"{prefix}.{unknown[0]}", f"unknown key (known keys: {known})")
        out: dict[str, Any] = {}
        for key, opt in spec.items():
            if key not in table:
                if opt.required:
                    raise self.fail(f"{prefix}.{key}", f"missing; expected {expect(opt.kind)}")
                out[key] = opt.default
                continue
            try:
                out[key] = convert(opt.kind, table[key])
            except ValueError as e:
                raise self.fail(f"{prefix}.{key}", f"expected {e}, got {table[key]!r}") from None
        return out


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file. Raises ConfigError (message for humans)."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    return parse(data, p)


def parse(data: Mapping[str, Any], p: Path) -> Config:
    """Validate an already-parsed TOML document (also used for the embedded demo config)."""
    c = _Checker(p)
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise c.fail(unknown[0], "unknown key (known keys: "
                     + ", ".join(sorted(TOP_KEYS)) + ")")
    mount = c.table("mount", data.get("mount", {}), _MOUNT_KEYS)
    metrics = None
    if mount["metrics"] is not None:
        try:
            metrics = parse_address(mount["metrics"])
        except ValueError as e:
            raise c.fail("mount.metrics", f"expected {e}, got {mount['metrics']!r}") from None

    cache = c.table("cache", data.get("cache", {}), _CACHE_KEYS)
    if cache["block_size"] < 4096 or cache["block_size"] & (cache["block_size"] - 1):
        raise c.fail("cache.block_size", "expected a power of two of at least 4KiB")
    if cache["memory_size"] < cache["block_size"] * 4:
        raise c.fail("cache.memory_size", "expected at least 4 × cache.block_size")
    cache_cfg = CacheConfig(
        dir=Path(cache["dir"]) if cache["dir"] else default_cache_dir(),
        disk_size=cache["disk_size"], memory_size=cache["memory_size"],
        block_size=cache["block_size"], readahead=cache["readahead"],
        max_prefetch_memory=cache["max_prefetch_memory"], fetch_size=cache["fetch_size"],
        page_cache=cache["page_cache"],
        spool_trim_after=cache["spool_trim_after"],
        max_write_behind=cache["max_write_behind"],
    )
    hashes = c.table("hash", data.get("hash", {}), _HASH_KEYS)

    ttl = data.get("metadata_ttl", 2.0)
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl < 0:
        raise c.fail("metadata_ttl", f"expected a number of seconds ≥ 0, got {ttl!r}")

    stores_t = data.get("stores")
    if not isinstance(stores_t, dict) or not stores_t:
        raise c.fail("stores", "expected at least one [stores.ID] table")
    stores = [_store(c, sid, t) for sid, t in stores_t.items()]
    defaults = [s.id for s in stores if s.default]
    if len(defaults) > 1:
        raise c.fail(f"stores.{defaults[1]}.default",
                     f"only one store may be the default (stores.{defaults[0]} already is)")
    return Config(path=p, cache=cache_cfg, hash=HashConfig(**hashes),
                  stores=tuple(stores), metadata_ttl=float(ttl),
                  stop_timeout=mount["stop_timeout"], metrics=metrics,
                  log_level=mount["log_level"])


def _refuse_inline_secrets(c: _Checker, prefix: str, table: Mapping[str, Any],
                           spec: Mapping[str, Option]) -> None:
    """``secret_access_key = "..."`` where ``secret_access_key_file`` is the key: say where a
    secret goes instead of only "unknown key" (and never echo the value)."""
    for key in table:
        if key not in spec and spec.get(f"{key}_file", Option()).kind == "secret_file":
            raise c.fail(f"{prefix}.{key}", f"secrets are not accepted in the config file; put "
                         f"it in a file readable by the daemon's user only (chmod 600) and "
                         f"name that file in {key}_file")


def _check_secret_file(c: _Checker, key: str, path: str) -> None:
    """A credential file others can read is refused: whoever reads it has the store.

    Mode bits only, on the file as named (links followed): group- or other-readable is an
    error unless the store sets ``allow_readable_secret_file = true`` (a group-shared
    credential on purpose). A file that does not exist, or cannot be stat'ed, is left to
    opening the store, which names it."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & 0o044:
        who = {0o044: "group and others", 0o040: "its group", 0o004: "others"}[mode & 0o044]
        raise c.fail(key, f"the secret file {path} is readable by {who} (mode "
                     f"{mode & 0o777:o}); chmod 600 it, or set allow_readable_secret_file = "
                     "true in this store")


def _store(c: _Checker, sid: str, table: Any) -> StoreConfig:
    prefix = f"stores.{sid}"
    if not STORE_ID.match(sid):
        raise c.fail(prefix, "store id must match [A-Za-z0-9][A-Za-z0-9_.-]*")
    if sid.startswith(RESERVED_ID_PREFIX):
        raise c.fail(prefix, f"ids starting with {RESERVED_ID_PREFIX!r} are reserved by Glance")
    if sid in RESERVED_IDS:
        raise c.fail(prefix, f"{sid!r} is reserved for the mount's default-store link")
    if not isinstance(table, dict):
        raise c.fail(prefix, "expected a table")
    stype = table.get("type")
    if stype is None:
        raise c.fail(f"{prefix}.type", "missing; expected one of " + ", ".join(store_types()))
    if stype not in store_types():
        raise c.fail(f"{prefix}.type",
                     f"unknown store type {stype!r}; expected one of " + ", ".join(store_types()))
    spec = dict(_COMMON_STORE_KEYS)
    spec.update(option_specs(stype))
    _refuse_inline_secrets(c, prefix, table, spec)
    values = c.table(prefix, table, spec)
    for key, opt in spec.items():
        if opt.kind == "secret_file" and values[key] and not values["allow_readable_secret_file"]:
            _check_secret_file(c, f"{prefix}.{key}", values[key])
    if values["timeout"] <= 0:
        raise c.fail(f"{prefix}.timeout", "expected a positive number of seconds")
    if values["concurrency"] < 0:
        raise c.fail(f"{prefix}.concurrency", "expected 0 (store default) or a positive integer")
    options = {k: v for k, v in values.items() if k not in _COMMON_STORE_KEYS}
    try:
        store_class(stype).check_options(options)
    except OptionError as e:
        raise c.fail(f"{prefix}.{e.key}", e.expected) from None
    return StoreConfig(
        id=sid, type=stype, description=values["description"], default=values["default"],
        read_only=values["read_only"], weight=values["weight"], timeout=values["timeout"],
        concurrency=values["concurrency"], options=options, source=c.path,
        chown=values["chown"],
    )
