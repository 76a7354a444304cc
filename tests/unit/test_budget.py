"""MemoryBudget: the per-store bound on upload buffers, whatever the number of uploads."""

from __future__ import annotations

import threading
import time

import pytest

from imagefs.stores.base import BackendError
from imagefs.stores.budget import MemoryBudget


def test_try_take_never_exceeds_the_limit_and_counts_refusals() -> None:
    b = MemoryBudget(10, "t")
    assert b.try_take(6)
    assert not b.try_take(5)
    assert b.try_take(4)
    assert (b.used, b.peak, b.refused) == (10, 10, 1)
    b.give(6)
    b.give(4)
    assert b.used == 0 and b.peak == 10


def test_take_waits_for_room_given_back_by_another_thread() -> None:
    b = MemoryBudget(8, "t")
    b.take(8, timeout=1)
    threading.Timer(0.2, b.give, args=(5,)).start()
    t0 = time.monotonic()
    b.take(5, timeout=10)
    assert time.monotonic() - t0 >= 0.1
    assert b.used == 8 and b.peak == 8


def test_take_times_out_with_a_backend_error() -> None:
    b = MemoryBudget(4, "store x")
    b.take(4, timeout=1)
    with pytest.raises(BackendError, match="store x: upload memory"):
        b.take(1, timeout=0.1)
    assert b.used == 4


def test_a_request_larger_than_the_budget_is_granted_alone() -> None:
    """It cannot be split; refusing it forever would hang its writer."""
    b = MemoryBudget(4, "t")
    b.take(9, timeout=0.1)
    assert b.used == 9
    with pytest.raises(BackendError):
        b.take(1, timeout=0.05)
    b.give(9)
    assert b.used == 0
