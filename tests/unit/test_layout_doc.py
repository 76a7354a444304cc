"""doc/LAYOUT.md names every module, so the map a newcomer reads first stays true."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _package_blocks(text: str) -> dict[str, str]:
    """``imagefs/stores/s3/`` -> the text of its entry (its line and the indented ones after)."""
    blocks: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^\s{4}(imagefs/\S+/)\s", line)
        if m:
            current = m.group(1)
            blocks[current] = line
        elif current and re.match(r"^\s{20,}\S", line):
            blocks[current] += " " + line
        else:
            current = None
    return blocks


def test_every_module_is_on_the_map() -> None:
    text = (ROOT / "doc" / "LAYOUT.md").read_text()
    blocks = _package_blocks(text)
    missing = []
    for path in sorted((ROOT / "imagefs").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if path.name in ("__init__.py", "__main__.py") and path.parent.name == "imagefs":
            continue
        package = path.parent.relative_to(ROOT).as_posix() + "/"
        if package in blocks:  # a store package: its modules are named in its entry
            if path.name != "__init__.py" and not re.search(rf"\b{path.stem}\b",
                                                             blocks[package]):
                missing.append(rel)
        elif path.name != "__init__.py" or package == "imagefs/stores/":
            if rel not in text:
                missing.append(rel)
    assert not missing, f"doc/LAYOUT.md does not name: {missing}"
