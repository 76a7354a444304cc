#!/usr/bin/env bash
# Set up everything (tools/setup.sh) and run the full test suite against real backends that the
# suite starts itself on 127.0.0.1. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
.venv/bin/ruff check imagefs tests
exec .venv/bin/python -m pytest -q "$@"
