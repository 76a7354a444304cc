"""Location strings without a server: the forms glance_store parses, and none where it has none.

glance_store takes file, swift and s3 names verbatim (no percent-decoding) and splits s3
locations at '@', ':' and '/', so what cannot be written that way must give no location
(``Unsupported``), never one naming another object. The same strings are checked against
glance_store itself in tests/integration/test_glance_interop.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from imagefs import config
from imagefs.stores import build
from imagefs.stores.base import Store, Unsupported, glance_literal


def store(tmp_path: Path, table: str) -> Store:
    p = tmp_path / "c.toml"
    p.write_text("[stores.a]\n" + table)
    return build(config.load(p).stores[0])


@pytest.mark.parametrize("name", ["0b9d2f4e-7c1a-4e3b-8f5d-2a6c9e1b7d30", "ubuntu 24.04.raw",
                                  "a%20b.raw", "ünïcode.qcow2", "x:y.raw"])
def test_names_glance_takes_verbatim(name: str) -> None:
    assert glance_literal(name, "name") == name


@pytest.mark.parametrize("name,also", [("a/b", ""), ("a?b", ""), ("a#b", ""), ("a\tb", ""),
                                       ("a\x7f", ""), ("trailing ", ""), ("", ""),
                                       ("a@b", "@")])
def test_names_glance_cannot_take(name: str, also: str) -> None:
    with pytest.raises(Unsupported):
        glance_literal(name, "name", also=also)


def test_s3_locations(tmp_path: Path) -> None:
    secret = tmp_path / "s"
    secret.write_text("se/cr+et\n")
    secret.chmod(0o600)  # a readable secret file is refused
    base = f'type="s3"\nbucket="images"\naccess_key_id="AK"\nsecret_access_key_file="{secret}"\n'
    http = store(tmp_path, base + 'endpoint_url="http://10.0.0.1:7480"\n')
    # glance_store writes s3:// for an http host, and reads credentials only from the location
    assert http.location("vm 1.raw") == "s3://10.0.0.1:7480/images/vm 1.raw"
    assert http.glance_location("vm.raw") == "s3://AK:se/cr+et@10.0.0.1:7480/images/vm.raw"
    https = store(tmp_path, base + 'endpoint_url="https://s3.example.org"\n')
    assert https.glance_location("vm.raw") == "s3+https://AK:se/cr+et@s3.example.org/images/vm.raw"
    aws = store(tmp_path, base)
    assert aws.location("vm.raw") == "s3+https://s3.amazonaws.com/images/vm.raw"
    for bad in ("a@b.raw", "a?b.raw"):
        with pytest.raises(Unsupported):
            http.location(bad)
    prefixed = store(tmp_path, base + 'prefix="glance/images/"\n')
    with pytest.raises(Unsupported):  # glance_store would take "images" for the bucket
        prefixed.location("vm.raw")
    flat = store(tmp_path, base + 'prefix="img-"\n')
    assert flat.location("vm.raw") == "s3+https://s3.amazonaws.com/images/img-vm.raw"
    secret.write_text("with:colon\n")  # glance_store splits the credentials at ':'
    with pytest.raises(Unsupported):
        http.glance_location("vm.raw")


def test_swift_and_file_locations(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_text("testing\n")
    key.chmod(0o600)
    sw = store(tmp_path, f'type="swift"\nauth_url="http://h/auth/v1.0"\nuser="t:t"\n'
                         f'key_file="{key}"\ncontainer="images"\nglance_reference="ref1"\n')
    assert sw.location("a b.raw") == sw.glance_location("a b.raw") == \
        "swift+config://ref1/images/a b.raw"
    with pytest.raises(Unsupported):
        sw.location("a#b.raw")
    d = tmp_path / "d"
    d.mkdir()
    f = store(tmp_path, f'type="file"\npath="{d}"\n')
    assert f.location("x y.raw") == f"file://{d}/x y.raw"
