"""ImageHasher and the ``user.imagefs.hashes`` value that ``imagefs hash`` sets."""

from __future__ import annotations

import hashlib
import json

import pytest

from imagefs.hashing import ImageHasher, parse_hashes


def test_hasher_counts_holes_as_zeros() -> None:
    h = ImageHasher("sha256")
    h.update(b"head")
    h.update_zeros(3 << 20)
    h.update(b"tail")
    want = b"head" + bytes(3 << 20) + b"tail"
    assert h.meta() == {"os_hash_algo": "sha256",
                        "os_hash_value": hashlib.sha256(want).hexdigest(),
                        "checksum": hashlib.md5(want).hexdigest()}
    assert h.offset == len(want)


def test_parse_hashes_accepts_what_imagefs_hash_sets() -> None:
    doc = {"version": "v1", "os_hash_algo": "sha384",
           "os_hash_value": hashlib.sha384(b"x").hexdigest(),
           "checksum": hashlib.md5(b"x").hexdigest()}
    version, meta = parse_hashes(json.dumps(doc))
    assert version == "v1"
    assert meta == {k: v for k, v in doc.items() if k != "version"}
    assert parse_hashes(json.dumps({k: v for k, v in doc.items() if k != "version"}))[0] is None


@pytest.mark.parametrize("doc, why", [
    ("[]", "JSON object"),
    ('{"os_hash_algo": 1}', "of strings"),
    ('{"os_hash_algo": "crc32", "os_hash_value": "00", "checksum": "00"}', "one of"),
    ('{"os_hash_algo": "sha256", "os_hash_value": "AB", "checksum": "00"}', "sha256 hex"),
    ('{"os_hash_algo": "md5", "os_hash_value": "' + "0" * 32 + '", "checksum": "x"}', "md5"),
    ('{"os_hash_algo": "md5", "surprise": ""}', "unknown keys"),
])
def test_parse_hashes_refuses_malformed_values(doc: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_hashes(doc)
