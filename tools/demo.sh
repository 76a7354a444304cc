#!/usr/bin/env bash
# Set up what the demo needs and mount the embedded demo config: two file stores ("fast",
# "archive") holding a small sample image, under /var/lib/imagefs-demo. No servers needed.
# Stop it with:  .venv/bin/imagefs umount /var/lib/imagefs-demo/mnt
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh --demo
exec .venv/bin/imagefs demo "${1:-/var/lib/imagefs-demo}"
