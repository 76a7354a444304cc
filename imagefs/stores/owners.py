"""Who owns an upload in progress: ids that let the next mount tell a crashed writer's leftovers
from a live writer's work.

An owner id is ``<host>_<pid>_<starttime>_<random>``. The process start time (clock ticks since
boot, from /proc) makes a recycled pid harmless. A leftover on this host whose process is gone
is "dead" and may be removed at once; one from another host is "elsewhere": nothing can be known
about it, so only its age may condemn it.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from typing import Any

from imagefs.options import option
from imagefs.procfs import start_time

_UNSAFE = re.compile(r"[^A-Za-z0-9-]")


def host() -> str:
    """This host's name, reduced to characters safe in object names and ids."""
    return _UNSAFE.sub("-", socket.gethostname())[:63].strip("-") or "host"


def new_owner_id() -> str:
    """A fresh id for one upload of this process."""
    pid = os.getpid()
    return f"{host()}_{pid}_{start_time(pid) or 0}_{secrets.token_hex(4)}"


def owner_state(owner_id: str) -> str:
    """"alive", "dead" (this host, process gone) or "elsewhere" (another host, or not an id)."""
    try:
        owner_host, pid, start, _rand = owner_id.rsplit("_", 3)
    except ValueError:
        return "elsewhere"
    if owner_host != host() or not pid.isdigit():
        return "elsewhere"
    return "alive" if start_time(int(pid)) == start else "dead"


def condemned(owner_id: str, age: float, leftover_age: float) -> bool:
    """Whether a leftover may be removed at mount: its owner ran on this host and is gone, or
    it comes from elsewhere and is more than ``leftover_age`` seconds old (0: any age).

    ``age`` is the time since the leftover last changed (its newest part or segment); every
    store applies this one rule, so ``leftover_age`` means the same in each."""
    state = owner_state(owner_id)
    if state == "elsewhere":
        return age > leftover_age
    return state == "dead"


def leftover_age_option() -> Any:
    """The ``leftover_age`` key of every store that leaves uploads behind a crash: one
    default and one meaning (``condemned``) for all of them."""
    return option("seconds", default=86400.0,
                  help="seconds after which uploads of other hosts count as dead")
