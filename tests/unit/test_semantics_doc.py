"""doc/SEMANTICS.md names the tests behind each promise: every one it names must exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_test_the_guarantees_name_exists() -> None:
    text = (ROOT / "doc" / "SEMANTICS.md").read_text()
    refs = re.findall(r"`(?:tests/(?:unit|integration)/)?(test_\w+\.py)(?:::(test_\w+))?", text)
    assert refs, "no test named"
    missing = []
    for module, name in refs:
        found = list((ROOT / "tests").glob(f"*/{module}"))
        if not found:
            missing.append(module)
        elif name and not re.search(rf"^def {name}\(", found[0].read_text(), re.M):
            missing.append(f"{module}::{name}")
    assert not missing, f"doc/SEMANTICS.md names tests that do not exist: {missing}"
