"""Swift store pieces that need no server: naming, header parsing, credentials from the
environment, segment sizing, the ranged-reply rule and a segment's memory accounting."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from imagefs.stores.base import BackendError
from imagefs.stores.budget import MemoryBudget
from imagefs.stores.swift import auth
from imagefs.stores.swift.layout import Dlo, dlo_of, info_of, safe_name
from imagefs.stores.swift.reading import Reader
from imagefs.stores.swift.segments import END, Segment, segment_target

MiB = 1 << 20


def test_segment_names_are_ascii_and_never_start_with_an_underscore() -> None:
    assert safe_name("vm 1%.raw") == "vm_1_.raw"
    assert safe_name("_x") == "x_x"
    assert safe_name("é") == "x_"
    assert len(safe_name("a" * 200)) == 64


def test_a_manifest_head_describes_only_our_own_slos() -> None:
    ours = {"content-length": "400", "etag": '"m"', "x-static-large-object": "True",
            "x-object-meta-imagefs-segments": "a/u", "x-object-meta-imagefs-size": "5",
            "x-object-meta-imagefs-etag": "e", "x-object-meta-mtime": "7"}
    info, group, slo = info_of("store s", "a", ours, manifest=True) or (None, None, None)
    assert info is not None and (info.size, info.version, info.mtime) == (5, "e", 7.0)
    assert (group, slo) == ("a/u", True) and "imagefs_size" not in info.meta
    foreign = {"content-length": "400", "etag": '"m"', "x-static-large-object": "true"}
    assert info_of("store s", "a", foreign, manifest=True) is None
    dlo = {"content-length": "0", "etag": '"d"', "x-object-manifest": "c/p"}
    assert info_of("store s", "a", dlo, manifest=True) is None
    with pytest.raises(BackendError, match="Content-Length"):
        info_of("store s", "a", {"etag": "x"})


def test_dlo_manifest_header_is_url_decoded() -> None:
    assert dlo_of({"x-object-manifest": "imgs/glance%20id-"}) == Dlo("imgs", "glance id-")
    assert dlo_of({"x-object-manifest": "nocontainer"}) is None
    assert Dlo("c", "p-").covers("c", "p-00001") and not Dlo("c", "p-").covers("d", "p-1")


def test_credentials_come_from_the_environment_as_for_the_swift_cli(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("ST_AUTH", "ST_USER", "ST_KEY", "ST_AUTH_VERSION", "OS_AUTH_VERSION",
                "OS_IDENTITY_API_VERSION", "OS_REGION_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OS_AUTH_URL", "http://k/v3")
    monkeypatch.setenv("OS_USERNAME", "u")
    monkeypatch.setenv("OS_PROJECT_NAME", "p")
    a = auth.resolve({"user_domain_name": "D", "project_domain_name": "D"})
    assert (a.auth_version, a.auth_url, a.user) == ("3", "http://k/v3", "u")
    assert a.os_options() == {"project_name": "p", "user_domain_name": "D",
                              "project_domain_name": "D"}
    assert auth.resolve({"auth_version": "1.0", "region_name": "r"}).os_options() == {
        "region_name": "r"}


def test_segments_grow_every_quarter_of_the_servers_limit() -> None:
    assert [segment_target(i, MiB, 1000, 5 << 30) for i in (0, 249, 250, 500)] == [
        MiB, MiB, 2 * MiB, 4 * MiB]
    assert segment_target(999, 4 << 30, 1000, 5 << 30) == 5 << 30


@pytest.mark.parametrize("status,headers,body,offset,want", [
    (206, {"content-range": "bytes 4-7/10"}, b"abcd", 4, b"abcd"),
    (206, {"content-range": "bytes 8-9/10"}, b"ij", 8, b"ij"),  # the end came first
    (200, {"content-length": "3"}, b"abc", 0, b"abc"),  # the whole object, within the range
])
def test_ranged_replies_follow_the_one_rule(status: int, headers: dict[str, str], body: bytes,
                                            offset: int, want: bytes) -> None:
    reader = Reader(SimpleNamespace(store_id="s"), SimpleNamespace(container="c"), "c_s")  # type: ignore[arg-type]
    assert reader._ranged_body("x", status, headers, body, offset, 4) == want


@pytest.mark.parametrize("status,headers,body,offset", [
    (200, {"content-length": "10"}, b"0123456789", 4),  # the whole object, not at 0
    (200, {"content-length": "4"}, b"012", 0),  # short body
    (206, {"content-range": "bytes 4-7/10"}, b"abc", 4),
    (206, {"content-range": "bytes 5-8/10"}, b"abcd", 4),
    (304, {}, b"", 0),
])
def test_bad_ranged_replies_are_errors(status: int, headers: dict[str, str], body: bytes,
                                       offset: int) -> None:
    reader = Reader(SimpleNamespace(store_id="s"), SimpleNamespace(container="c"), "c_s")  # type: ignore[arg-type]
    with pytest.raises(BackendError):
        reader._ranged_body("x", status, headers, body, offset, 4)


def test_a_segment_gives_back_the_memory_of_every_chunk() -> None:
    budget = MemoryBudget(10, "test")
    seg = Segment(0, "g/00000000", 100, budget)
    chunks: list[Any] = [memoryview(b"abc"), memoryview(b"de")]
    for c in chunks:
        budget.take(len(c), 1.0)
        seg.q.put(c)
    seg.q.put(END)
    assert b"".join(bytes(c) for c in seg.chunks(idle=1.0)) == b"abcde"
    assert seg.sent == 5 and budget.try_take(10)
    budget.give(10)
    budget.take(3, 1.0)
    seg.q.put(memoryview(b"xyz"))
    seg.abort()
    seg.drain()
    assert seg.closed and budget.try_take(10)
