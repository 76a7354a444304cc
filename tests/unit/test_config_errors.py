"""Malformed configs (issue 11): each one exits 2 from the command line with a message that
names the file and the key, and says what was expected. Also the rule for secret files: one
that group or others can read is refused unless the store allows it explicitly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from imagefs import cli

FILE = '[stores.a]\ntype = "file"\npath = "/srv/a"\n'
S3 = '[stores.a]\ntype = "s3"\nbucket = "images"\n'
SWIFT = ('[stores.a]\ntype = "swift"\nauth_url = "http://127.0.0.1:1/auth/v1.0"\n'
         'user = "t:t"\ncontainer = "c"\nkey_file = "@KEY@"\n')
RBD = '[stores.a]\ntype = "rbd"\nconf = "/etc/ceph/ceph.conf"\npool = "images"\n'
CINDER = ('[stores.a]\ntype = "cinder"\nauth = "noauth"\nendpoint = "http://127.0.0.1:1/v3"\n'
          'user_id = "u"\nproject_id = "p"\nceph_conf = "/etc/ceph/ceph.conf"\n')

#: (id, config text, the key the message must name, a word of what was expected)
CASES = [
    ("bad-toml", '[stores.a\ntype = "file"\n', None, "not valid TOML"),
    ("bad-toml-value", '[stores.a]\ntype = file\n', None, "not valid TOML"),
    ("unknown-top-key", "bogus = 1\n" + FILE, "bogus", "unknown key"),
    ("unknown-store-key", FILE + "bogus = 1\n", "stores.a.bogus", "unknown key"),
    ("unknown-cache-key", "[cache]\nbogus = 1\n" + FILE, "cache.bogus", "unknown key"),
    ("unknown-mount-key", "[mount]\nbogus = 1\n" + FILE, "mount.bogus", "unknown key"),
    ("unknown-hash-key", "[hash]\nbogus = 1\n" + FILE, "hash.bogus", "unknown key"),
    ("no-stores", "[cache]\n", "stores", "at least one"),
    ("stores-not-table", "stores = 1\n", "stores", "at least one"),
    ("store-not-table", "[stores]\na = 1\n", "stores.a", "table"),
    ("cache-not-table", "cache = 1\n" + FILE, "cache", "table"),
    ("missing-type", '[stores.a]\npath = "/srv/a"\n', "stores.a.type", "missing"),
    ("unknown-type", '[stores.a]\ntype = "ftp"\n', "stores.a.type", "unknown store type"),
    ("type-not-string", "[stores.a]\ntype = 1\n", "stores.a.type", "unknown store type"),
    ("file-missing-path", '[stores.a]\ntype = "file"\n', "stores.a.path", "missing"),
    ("http-missing-url", '[stores.a]\ntype = "http"\n', "stores.a.url", "missing"),
    ("s3-missing-bucket", '[stores.a]\ntype = "s3"\n', "stores.a.bucket", "missing"),
    ("rbd-missing-conf", '[stores.a]\ntype = "rbd"\npool = "p"\n', "stores.a.conf", "missing"),
    ("rbd-missing-pool", '[stores.a]\ntype = "rbd"\nconf = "/c"\n', "stores.a.pool", "missing"),
    ("swift-missing-container", SWIFT.replace('container = "c"\n', ""),
     "stores.a.container", "missing"),
    ("cinder-missing-ceph-conf", CINDER.replace('ceph_conf = "/etc/ceph/ceph.conf"\n', ""),
     "stores.a.ceph_conf", "missing"),
    ("cinder-noauth-missing-user", CINDER.replace('user_id = "u"\n', ""),
     "stores.a.user_id", "noauth"),
    ("two-defaults", FILE + 'default = true\n[stores.b]\ntype = "file"\npath = "/b"\n'
     "default = true\n", "stores.b.default", "only one"),
    ("bad-size", '[cache]\nmemory_size = "lots"\n' + FILE, "cache.memory_size", "size"),
    ("negative-size", "[cache]\ndisk_size = -1\n" + FILE, "cache.disk_size", "negative"),
    ("size-unit", '[cache]\nreadahead = "4XB"\n' + FILE, "cache.readahead", "size"),
    ("block-not-power-of-two", '[cache]\nblock_size = "3MiB"\n' + FILE, "cache.block_size",
     "power of two"),
    ("memory-below-4-blocks", '[cache]\nmemory_size = "2MiB"\n' + FILE, "cache.memory_size",
     "4 ×"),
    ("bool-as-string", FILE + 'read_only = "yes"\n', "stores.a.read_only", "true or false"),
    ("int-as-string", FILE + 'weight = "heavy"\n', "stores.a.weight", "integer"),
    ("int-as-bool", FILE + "weight = true\n", "stores.a.weight", "integer"),
    ("zero-timeout", FILE + "timeout = 0\n", "stores.a.timeout", "positive"),
    ("negative-concurrency", FILE + "concurrency = -1\n", "stores.a.concurrency", "positive"),
    ("bad-chown", FILE + 'chown = "maybe"\n', "stores.a.chown", "one of"),
    ("bad-hash-algo", '[hash]\nalgo = "crc32"\n' + FILE, "hash.algo", "one of"),
    ("negative-ttl", "metadata_ttl = -1\n" + FILE, "metadata_ttl", "≥ 0"),
    ("negative-stop-timeout", "[mount]\nstop_timeout = -5\n" + FILE, "mount.stop_timeout",
     "≥ 0"),
    ("metrics-no-host", '[mount]\nmetrics = "9488"\n' + FILE, "mount.metrics", "address"),
    ("metrics-bad-port", '[mount]\nmetrics = "127.0.0.1:99999"\n' + FILE, "mount.metrics",
     "port"),
    ("metrics-not-string", "[mount]\nmetrics = 9488\n" + FILE, "mount.metrics", "string"),
    ("bad-log-level", '[mount]\nlog_level = "verbose"\n' + FILE, "mount.log_level", "one of"),
    ("bad-store-id", '[stores."bad id"]\ntype = "file"\npath = "/a"\n', "stores.bad id",
     "store id"),
    ("reserved-id", '[stores.default]\ntype = "file"\npath = "/a"\n', "stores.default",
     "reserved"),
    ("glance-reserved-id", '[stores.os_glance_x]\ntype = "file"\npath = "/a"\n',
     "stores.os_glance_x", "reserved"),
    ("s3-key-without-secret", S3 + 'access_key_id = "AK"\n', "stores.a.secret_access_key_file",
     "together"),
    ("s3-inline-secret", S3 + 'access_key_id = "AK"\nsecret_access_key = "s3cr3t-value"\n',
     "stores.a.secret_access_key", "secret_access_key_file"),
    ("swift-inline-key", SWIFT + 'key = "sw1ft-value"\n', "stores.a.key", "key_file"),
    ("cinder-inline-password", CINDER + 'password = "c1nder-value"\n', "stores.a.password",
     "password_file"),
    ("s3-part-too-small", S3 + 'part_size = "1MiB"\n', "stores.a.part_size", "5MiB"),
    ("s3-bad-addressing", S3 + 'addressing_style = "sideways"\n',
     "stores.a.addressing_style", "one of"),
    ("s3-bad-bucket", '[stores.a]\ntype = "s3"\nbucket = "No_Such"\n', "stores.a.bucket",
     "bucket name"),
    ("http-images-not-list", '[stores.a]\ntype = "http"\nurl = "http://h/"\nimages = "a.raw"\n',
     "stores.a.images", "list"),
    ("swift-bad-auth-version", SWIFT + 'auth_version = "2"\n', "stores.a.auth_version",
     "one of"),
    ("rbd-path-not-string", RBD.replace('conf = "/etc/ceph/ceph.conf"', "conf = 5"),
     "stores.a.conf", "path"),
]


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    k = tmp_path / "swift.key"
    k.write_text("k\n")
    k.chmod(0o600)
    return k


@pytest.mark.parametrize(("text", "key", "expected"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_malformed_config_exits_2_naming_file_and_key(
        text: str, key: str | None, expected: str, tmp_path: Path, key_file: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "imagefs.toml"
    cfg.write_text(text.replace("@KEY@", str(key_file)))
    with pytest.raises(SystemExit) as e:
        cli.main(["check-config", str(cfg)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"imagefs: {cfg}: "), err
    if key is not None:
        assert f"{cfg}: {key}: " in err, err
    assert expected in err, err
    for value in ("s3cr3t-value", "sw1ft-value", "c1nder-value"):
        assert value not in err, "a secret was echoed"


def test_there_are_thirty_cases() -> None:
    assert len(CASES) >= 30


def test_mount_and_check_config_exit_2_from_the_command_line(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[stores.a]\ntype = "file"\n')
    (tmp_path / "mnt").mkdir()
    for argv in (["check-config", str(cfg), "--connect"],
                 ["mount", str(cfg), str(tmp_path / "mnt")]):
        r = subprocess.run([sys.executable, "-m", "imagefs", *argv], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2 and f"{cfg}: stores.a.path: missing" in r.stderr, r.stderr


@pytest.mark.parametrize(("mode", "who"), [(0o644, "group and others"), (0o640, "its group"),
                                           (0o604, "others")])
def test_readable_secret_file_is_refused(tmp_path: Path, mode: int, who: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    secret = tmp_path / "s3.secret"
    secret.write_text("s3cr3t-value\n")
    secret.chmod(mode)
    cfg = tmp_path / "c.toml"
    cfg.write_text(S3 + f'access_key_id = "AK"\nsecret_access_key_file = "{secret}"\n')
    with pytest.raises(SystemExit) as e:
        cli.main(["check-config", str(cfg)])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert f"{cfg}: stores.a.secret_access_key_file: the secret file {secret} is readable " \
           f"by {who} (mode {mode:o}); chmod 600" in err, err
    # allowed explicitly, or made private: accepted
    cfg.write_text(S3 + f'access_key_id = "AK"\nsecret_access_key_file = "{secret}"\n'
                   "allow_readable_secret_file = true\n")
    assert cli.main(["check-config", str(cfg)]) == 0
    secret.chmod(0o600)
    cfg.write_text(S3 + f'access_key_id = "AK"\nsecret_access_key_file = "{secret}"\n')
    assert cli.main(["check-config", str(cfg)]) == 0
    assert "s3cr3t-value" not in capsys.readouterr().out


def test_secret_files_of_every_type_are_checked(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    loose = tmp_path / "loose"
    loose.write_text("x\n")
    loose.chmod(0o644)
    for text, key in ((SWIFT.replace("@KEY@", str(loose)), "key_file"),
                      ('[stores.a]\ntype = "cinder"\nauth_url = "http://k:5000/v3"\n'
                       f'user = "u"\npassword_file = "{loose}"\nproject = "p"\n'
                       'ceph_conf = "/etc/ceph/ceph.conf"\n', "password_file")):
        cfg = tmp_path / "c.toml"
        cfg.write_text(text)
        with pytest.raises(SystemExit):
            cli.main(["check-config", str(cfg)])
        assert f"stores.a.{key}: the secret file {loose} is readable" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "expected"), [("127.0.0.1:9488", ("127.0.0.1", 9488)),
                                                ("[::1]:9488", ("::1", 9488)),
                                                ("localhost:1", ("localhost", 1))])
def test_metrics_addresses_accepted(text: str, expected: tuple[str, int], tmp_path: Path
                                    ) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[mount]\nmetrics = "{text}"\nlog_level = "warning"\n' + FILE)
    from imagefs import config

    c = config.load(cfg)
    assert c.metrics == expected and c.log_level == "warning"
    assert config.load(tmp_path / "c.toml").stop_timeout == 30.0
