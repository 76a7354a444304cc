"""S3 store pieces that need no server: config checks, part sizing, metadata encoding."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagefs import config
from imagefs.stores.s3 import layout as s

S3 = '[stores.a]\ntype="s3"\nbucket="images"\n'


def load(tmp_path: Path, text: str) -> config.Config:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return config.load(p)


@pytest.mark.parametrize("extra,key,expect", [
    ('', "stores.a.bucket", None),
    ('access_key_id="AK"\n', "stores.a.secret_access_key_file", "given together"),
    ('secret_access_key_file="/k"\n', "stores.a.access_key_id", "given together"),
    ('profile="p"\naccess_key_id="AK"\nsecret_access_key_file="/k"\n', "stores.a.profile",
     "not both"),
    ('part_size="1MiB"\n', "stores.a.part_size", "5MiB to 5GiB"),
    ('addressing_style="dns"\n', "stores.a.addressing_style", 'one of "path"'),
    ('endpoint_url="ftp://x"\n', "stores.a.endpoint_url", "http:// or https://"),
    ('prefix="/abs/"\n', "stores.a.prefix", "leading"),
])
def test_s3_config_checks(tmp_path: Path, extra: str, key: str, expect: str | None) -> None:
    if expect is None:
        store = load(tmp_path, S3 + extra).stores[0]
        assert store.options["part_size"] == 8 << 20 and store.options["prefix"] == ""
        return
    with pytest.raises(config.ConfigError) as e:
        load(tmp_path, S3 + extra)
    assert f": {key}:" in str(e.value) and expect in str(e.value), str(e.value)


def test_bad_bucket_name(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="stores.a.bucket: .*bucket name"):
        load(tmp_path, '[stores.a]\ntype="s3"\nbucket="Bad_Bucket"\n')


def test_part_sizes_fit_any_image_in_10000_parts() -> None:
    base = 8 << 20
    sizes = [s.part_size_for(base, n) for n in range(1, s.MAX_PARTS + 1)]
    assert sizes[0] == sizes[999] == base and sizes[1000] == 2 * base
    assert all(a <= b for a, b in zip(sizes, sizes[1:], strict=False))
    assert sum(sizes) >= 5 << 40  # S3's largest object
    assert max(sizes) <= s.MAX_PART


def test_metadata_keys_survive_dash_encoding() -> None:
    meta = {"os_hash_algo": "sha512", "mtime": "1.5", "mode": "644", "Bad-Key": "x"}
    enc = s.encode_meta(meta)
    assert enc == {"os-hash-algo": "sha512", "mtime": "1.5", "mode": "644"}
    assert s.decode_meta(enc) == {"os_hash_algo": "sha512", "mtime": "1.5", "mode": "644"}
