"""Config validation: every bad file names the file, the key and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagefs import config
from tests.mounting import to_toml


def load(tmp_path: Path, text: str) -> config.Config:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return config.load(p)


GOOD = """
[cache]
dir = "/tmp/x"
memory_size = "64MiB"
[stores.fast]
type = "file"
path = "/srv/fast"
default = true
[stores.mirror]
type = "http"
url = "http://127.0.0.1:8080/images/"
"""


def test_good_config(tmp_path: Path) -> None:
    c = load(tmp_path, GOOD)
    assert [s.id for s in c.stores] == ["fast", "mirror"]
    assert c.cache.memory_size == 64 << 20
    assert c.default_store is not None and c.default_store.id == "fast"
    assert c.stores[1].options["url"] == "http://127.0.0.1:8080/images/"


@pytest.mark.parametrize("text,key,expect", [
    ('[stores.a]\ntype="file"\npath="/x"\ncolour="red"\n', "stores.a.colour", "unknown key"),
    ('[stores.a]\ntype="file"\npath=3\n', "stores.a.path", "expected a path string"),
    ('[stores.a]\ntype="ftp"\n', "stores.a.type", "unknown store type 'ftp'"),
    ('[stores.a]\ntype="file"\npath="/a"\ndefault=true\n[stores.b]\ntype="file"\npath="/b"\n'
     'default=true\n', "stores.b.default", "only one store may be the default"),
    ('[cache]\nmemory_size="lots"\n[stores.a]\ntype="file"\npath="/a"\n', "cache.memory_size",
     "expected a size"),
    ('[stores.a]\ntype="file"\n', "stores.a.path", "missing"),
    ('[stores."bad id"]\ntype="file"\npath="/a"\n', "stores.bad id", "store id must match"),
    ('[stores.os_glance_x]\ntype="file"\npath="/a"\n', "stores.os_glance_x", "reserved"),
    ('[stores.a]\ntype="http"\nurl="ftp://x/"\n', "stores.a.url", "http:// or https://"),
    ('[stores.a]\ntype="http"\nurl="http://u:p@x/"\n', "stores.a.url", "without credentials"),
    ('[stores.a]\ntype="file"\npath="/a"\nread_only="yes"\n', "stores.a.read_only",
     "true or false"),
    ('stores = 1\n', "stores", "expected at least one"),
    ('[stores.a\n', "", "not valid TOML"),
])
def test_bad_configs_name_file_key_expectation(tmp_path: Path, text: str, key: str,
                                               expect: str) -> None:
    with pytest.raises(config.ConfigError) as e:
        load(tmp_path, text)
    msg = str(e.value)
    assert msg.startswith(str(tmp_path / "c.toml") + ":"), msg
    assert f": {key}:" in msg or not key, msg
    assert expect in msg, msg


@pytest.mark.parametrize("text,value", [
    ("4MiB", 4 << 20), ("20GiB", 20 << 30), ("1.5KiB", 1536), (4096, 4096), ("10MB", 10**7),
])
def test_sizes(text: str | int, value: int) -> None:
    assert config.parse_size(text) == value


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="no such file"):
        config.load(tmp_path / "nope.toml")


def test_toml_writer_round_trips() -> None:
    import tomllib

    doc = {"cache": {"dir": 'a "q"', "memory_size": "64MiB"},
           "stores": {"x": {"type": "file", "path": "/p", "default": True, "weight": 3,
                            "images": ["a", "b"]}}}
    assert tomllib.loads(to_toml(doc)) == doc
