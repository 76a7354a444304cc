"""Two hosts on one store: two daemons (two mounts, each with its own cache directory) on the
same bucket, container or pool, as two hypervisors share a Glance store.

* An image replaced through one host is seen through the other within the listing TTL
  (``metadata_ttl``), bytes and size.
* A reader on the second host that opened before the replace reads the old bytes or gets EIO,
  never a mix: the content is checked, not only the length (the replacement has the same size).
* Writers of one name on both hosts at once end with one whole image: exactly one writer's
  bytes (one whose close succeeded), never a blend, by both mounts and the backend's client;
  and neither is refused as busy.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import threading
import time
from typing import Any

import pytest

from tests.integration.test_model import backend_bytes
from tests.mounting import Mount

MiB = 1 << 20
TTL = 1.0
SIZE = 12 * MiB  # more than one S3 part, Swift segment and cache fetch


def pattern(size: int, seed: str) -> bytes:
    """Every MiB different, so a block of the wrong version shows wherever it lands."""
    return b"".join(hashlib.sha512(f"{seed}{i}".encode()).digest() * (MiB // 64)
                    for i in range(size // MiB))


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(params=["s3", "swift", "rbd"])
def hosts(request: pytest.FixtureRequest, mount_factory: Any
          ) -> tuple[Mount, Mount, dict[str, Any]]:
    table = request.getfixturevalue(f"{request.param}_store_table")
    # Small read-ahead: the reader's later blocks are fetched after the replace.
    cache = {"readahead": "1MiB", "fetch_size": "1MiB"}
    a = mount_factory({"s": table}, cache=cache, metadata_ttl=TTL)
    b = mount_factory({"s": table}, cache=cache, metadata_ttl=TTL)
    return a, b, table


def test_replace_on_one_host_is_seen_on_the_other_and_never_mixes_into_its_readers(
        hosts: tuple[Mount, Mount, dict[str, Any]]) -> None:
    """One test for both promises: each pair of mounts costs seconds to set up and tear down."""
    a, b, table = hosts
    old, new = pattern(SIZE, "old"), pattern(SIZE, "new")  # same size: only bytes tell
    a.path("s", "img.raw").write_bytes(old)
    time.sleep(TTL + 0.5)
    # A reader on b opened before the replace: old bytes, then (its version gone) EIO.
    got = bytearray()
    with open(b.path("s", "img.raw"), "rb", buffering=0) as f:
        got += f.read(MiB)
        a.path("s", "img.raw").write_bytes(new)
        time.sleep(TTL + 0.5)  # b's listing has heard of the new version by now
        outcome = "whole"
        try:
            while chunk := f.read(MiB):
                got += chunk
        except OSError as e:
            assert e.errno == errno.EIO, e
            outcome = f"EIO after {len(got)} bytes"
    print(f"reader opened before the replace: {outcome}")
    assert bytes(got) == old[:len(got)], "a reader mixed bytes of two versions"
    assert outcome != "whole" or len(got) == SIZE, "the old image read short, without EIO"
    assert b.path("s", "img.raw").read_bytes() == new  # now in b's caches
    # Replaced again (another size): b reads the new image within the listing TTL.
    newer = pattern(SIZE + MiB, "newer")
    a.path("s", "img.raw").write_bytes(newer)
    replaced = time.monotonic()
    while True:
        seen = b.path("s", "img.raw").read_bytes()
        if seen == newer:
            break
        assert seen == new, "host b read neither the old nor the new image"
        assert time.monotonic() - replaced < TTL + 2, "host b still reads the old image"
        time.sleep(0.2)
    assert os.stat(b.path("s", "img.raw")).st_size == len(newer)
    assert os.listdir(b.path("s")) == ["img.raw"]


def _race(hosts: dict[str, Mount], images: dict[str, bytes]
          ) -> dict[str, subprocess.CompletedProcess[bytes]]:
    """A ``dd`` on each host writing its image to ``img.raw``, released at the same moment."""
    results: dict[str, subprocess.CompletedProcess[bytes]] = {}
    go = threading.Barrier(len(hosts))

    def write(host: str) -> None:
        go.wait()
        results[host] = subprocess.run(["dd", f"of={hosts[host].path('s', 'img.raw')}",
                                        "bs=1M", "status=none"], input=images[host],
                                       capture_output=True, timeout=300)

    threads = [threading.Thread(target=write, args=(h,)) for h in hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_writers_of_one_name_on_two_hosts_end_with_one_whole_image(
        hosts: tuple[Mount, Mount, dict[str, Any]]) -> None:
    a, b, table = hosts
    a.path("s", "img.raw").write_bytes(pattern(SIZE, "before"))
    for round_ in range(2):
        images = {"a": pattern(SIZE, f"a{round_}"), "b": pattern(SIZE, f"b{round_}")}
        results = _race({"a": a, "b": b}, images)
        ok = {h for h, r in results.items() if r.returncode == 0}
        closes = {h: r.stderr.decode()[-300:] for h, r in results.items()}
        assert ok, closes
        # Nothing else uses the image: no EBUSY (RBD refused both, each host taking the
        # other's check for a VM using it). A Swift writer whose manifest was replaced by the
        # other's before it could confirm its own reports EIO: last writer wins, and says so.
        assert not any("busy" in c for c in closes.values()), closes
        final = backend_bytes(table, "img.raw")
        winners = [h for h in ok if digest(images[h]) == digest(final)]
        assert winners, (f"round {round_}: the image is no successful writer's whole image "
                         f"({len(final)} bytes; closes: {closes})")
        time.sleep(TTL + 0.5)
        for m in (a, b):
            assert digest(m.path("s", "img.raw").read_bytes()) == digest(final)
            assert os.listdir(m.path("s")) == ["img.raw"]
