"""The manual pages document what the code has: every config key of every table and store type
(config.py's option tables and each store's OPTIONS) in imagefs.toml(5), every command and
option of the argparse parsers in imagefs(8) and mount.imagefs(8), every ``-o`` option; and
they are lint-clean for mandoc. A key or option added without its page fails here."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from imagefs import cli, config, daemon
from imagefs.stores import option_specs, store_types

MAN = Path(__file__).resolve().parents[2] / "man"
PAGES = ("imagefs.8", "imagefs.toml.5", "mount.imagefs.8")


def sections(page: str) -> dict[str, str]:
    """``.SH`` title → its text (until the next ``.SH``)."""
    out: dict[str, str] = {}
    title = ""
    for line in (MAN / page).read_text().splitlines():
        if line.startswith(".SH "):
            title = line[4:].strip()
            out[title] = ""
        else:
            out[title] = out.get(title, "") + line + "\n"
    return out


def bold(text: str) -> set[str]:
    """Words set in bold: arguments of .B/.BR/.RB/.BI/.IR macro lines and \\fB...\\fR runs,
    with roff's ``\\-`` as ``-``."""
    text = text.replace("\\-", "-")
    words: set[str] = set()
    for line in text.splitlines():
        m = re.match(r"^\.(B|BR|RB|BI|IB)\s+(.*)$", line)
        if m:
            words |= {w.strip('",|+[]()') for w in re.findall(r'"[^"]*"|\S+', m.group(2))}
            words |= {w for chunk in re.findall(r'"([^"]*)"', m.group(2)) for w in chunk.split()}
    for run in re.findall(r"\\fB(.*?)\\f[RPI]", text):
        words |= set(run.split())
    return {w.strip('",|+[]()') for w in words} | {w.rstrip("=") for w in words}


def test_every_config_key_is_in_imagefs_toml_5() -> None:
    secs = sections("imagefs.toml.5")
    missing = []
    tables = {"[cache]": config._CACHE_KEYS, "[hash]": config._HASH_KEYS,
              "[mount]": config._MOUNT_KEYS, "COMMON STORE KEYS": config._COMMON_STORE_KEYS}
    tables.update({f'type = "{t}"': option_specs(t) for t in store_types()})
    for title, spec in tables.items():
        assert title in secs, f"imagefs.toml(5) has no section {title!r}"
        documented = bold(secs[title])
        missing += [f"{title} {key}" for key in spec if key not in documented]
    documented = bold(secs["DESCRIPTION"])
    missing += [f"top-level {key}" for key in config.TOP_KEYS
                if key not in documented and f"[{key}]" not in documented
                and f"[{key}." not in secs["DESCRIPTION"]]
    assert not missing, "not in man/imagefs.toml.5: " + ", ".join(missing)


def _subcommands(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(p: argparse.ArgumentParser) -> list[list[str]]:
    """Each optional argument's spellings, without -h/--help."""
    return [a.option_strings for a in p._actions
            if a.option_strings and not isinstance(a, argparse._HelpAction)]


def _synopsis_of(synopsis: str, command: str) -> str:
    """The SYNOPSIS lines of ``imagefs COMMAND`` (up to the next .br)."""
    text = synopsis.replace("\\-", "-")
    m = re.search(rf"^\.B imagefs {re.escape(command)}\n(.*?)(?=^\.br|\Z)", text, re.S | re.M)
    assert m, f"imagefs(8) SYNOPSIS has no 'imagefs {command}'"
    return m.group(1)


def test_every_command_and_option_is_in_imagefs_8() -> None:
    secs = sections("imagefs.8")
    commands = bold(secs["COMMANDS"])
    missing = []
    for name, sub in _subcommands(cli.parser()).items():
        if name not in commands:
            missing.append(f"COMMANDS: {name}")
        synopsis = _synopsis_of(secs["SYNOPSIS"], name)
        for spellings in _options(sub):
            if not any(re.search(rf"(?<![\w-]){re.escape(s)}(?![\w-])", synopsis)
                       for s in spellings):
                missing.append(f"SYNOPSIS of {name}: {'/'.join(spellings)}")
    assert cli.parser_commands() == set(_subcommands(cli.parser()))
    assert "--version" in secs["SYNOPSIS"].replace("\\-", "-")
    mount_options = bold(secs["MOUNT OPTIONS"])
    missing += [f"MOUNT OPTIONS: {o}" for o in daemon.OPTION_FORMS
                if o.split("=")[0] not in mount_options]
    assert not missing, "not in man/imagefs.8: " + ", ".join(missing)


def test_every_helper_option_is_in_mount_imagefs_8() -> None:
    p = argparse.ArgumentParser()
    cli._add_mount_args(p)
    text = (MAN / "mount.imagefs.8").read_text().replace("\\-", "-")
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()) as out, pytest.raises(SystemExit):
        cli.mount_helper(["--help"])
    helper_opts = set(re.findall(r"(?<![\w-])(-[a-z]|--[a-z-]+)", out.getvalue())) - {"-h",
                                                                                     "--help"}
    missing = [o for o in sorted(helper_opts) if not re.search(rf"(?<![\w-]){o}(?![\w-])", text)]
    assert helper_opts >= {"-o", "-n", "-s", "-v", "--version"}
    assert not missing, "not in man/mount.imagefs.8: " + ", ".join(missing)


@pytest.mark.parametrize("page", PAGES)
def test_man_page_is_lint_clean(page: str) -> None:
    if shutil.which("mandoc") is None:
        pytest.fail("mandoc is not installed (tools/setup.sh installs it)")
    r = subprocess.run(["mandoc", "-T", "lint", "-W", "warning", str(MAN / page)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr
    r = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", str(MAN / page)],
                       capture_output=True, text=True, timeout=60,
                       env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
