"""Store options: the vocabulary of typed config keys, and one store's validated table.

A leaf module (it imports nothing of imagefs) because both sides need it: ``imagefs.config``
validates files against these specs, and each store declares its own keys with them. Keeping
it here is what lets ``config`` import the store registry without the stores importing
``config`` back.

A store declares its keys as a frozen dataclass of ``option()`` fields::

    @dataclass(frozen=True)
    class S3Options:
        bucket: str = option("str", required=True)
        prefix: str = option("str", default="")

``spec_of(S3Options)`` is the ``{key: Option}`` table the loader checks a file against, and
the store gets an ``S3Options`` instance, so a misspelt option is an AttributeError at the
first test rather than a ``KeyError`` at an operator's first mount.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1 << 10,
    "m": 1000**2, "mb": 1000**2, "mib": 1 << 20,
    "g": 1000**3, "gb": 1000**3, "gib": 1 << 30,
    "t": 1000**4, "tb": 1000**4, "tib": 1 << 40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str | int) -> int:
    """'4MiB' → 4194304. Integers are bytes. Raises ValueError with the accepted forms."""
    if isinstance(text, bool):
        raise ValueError("expected a size like \"4MiB\", \"20GiB\" or a number of bytes")
    if isinstance(text, int):
        if text < 0:
            raise ValueError("a size cannot be negative")
        return text
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise ValueError("expected a size like \"4MiB\", \"20GiB\" or a number of bytes")
    return int(float(m.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class Option:
    """One type-specific store key: its kind, whether required, and its default.

    kinds: str, path, secret_file (a path to a file holding a credential, see
    ``imagefs.config``), bool, int, float, seconds (a float, 0 or more), size, list (of
    str), or a tuple of allowed strings.
    """

    kind: Any = "str"
    required: bool = False
    default: Any = None
    help: str = ""


def expect(kind: Any) -> str:
    if isinstance(kind, tuple):
        return "one of " + ", ".join(f'"{k}"' for k in kind)
    return {
        "str": "a string", "path": "a path string", "bool": "true or false",
        "int": "an integer", "float": "a number", "seconds": "a number of seconds ≥ 0",
        "size": 'a size like "4MiB"',
        "list": "a list of strings", "secret_file": "a path string",
    }[kind]


def convert(kind: Any, value: Any) -> Any:
    """Check ``value`` against ``kind``; raise ValueError with what was expected."""
    if isinstance(kind, tuple):
        if value not in kind:
            raise ValueError(expect(kind))
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise ValueError(expect(kind))
        return value
    if kind in ("path", "secret_file"):
        if not isinstance(value, str) or not value:
            raise ValueError(expect(kind))
        return os.path.expanduser(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(expect(kind))
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(expect(kind))
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(expect(kind))
        return float(value)
    if kind == "seconds":
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(expect(kind))
        return float(value)
    if kind == "size":
        if not isinstance(value, str | int):
            raise ValueError(expect(kind))
        return parse_size(value)
    if kind == "list":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(expect(kind))
        return tuple(value)
    raise AssertionError(f"unknown option kind {kind!r}")

@dataclass(frozen=True)
class StoreConfig:
    """One ``[stores.ID]`` table, validated: the keys every store has, and ``options``, its
    type's own keys (checked against the store class's spec, defaults filled in)."""

    id: str
    type: str
    description: str
    default: bool
    read_only: bool
    weight: int
    timeout: float
    concurrency: int
    options: Mapping[str, Any]
    source: Path
    #: What chown/chgrp to another owner does: EPERM, accepted and dropped, or kept as
    #: image metadata (``rsync -a`` of images owned by glance or libvirt-qemu needs one).
    chown: str = "refuse"


class OptionError(ValueError):
    """A store-specific config problem: ``key`` (within the store table) and what was expected."""

    def __init__(self, key: str, expected: str) -> None:
        super().__init__(expected)
        self.key = key
        self.expected = expected


def option(kind: Any = "str", *, required: bool = False, default: Any = None,
           help: str = "") -> Any:
    """A dataclass field that is also a config key (see the module docstring)."""
    return dataclasses.field(default=default, metadata={
        "option": Option(kind, required=required, default=default, help=help)})


def spec_of(options_class: type) -> dict[str, Option]:
    """The ``{key: Option}`` table of a dataclass of ``option()`` fields."""
    return {f.name: f.metadata["option"] for f in dataclasses.fields(options_class)}
