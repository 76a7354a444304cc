#!/usr/bin/env bash
# Install what imagefs needs on Debian 12 (as root): Debian packages, then a venv in .venv with
# the project installed. Idempotent: a second run installs nothing new.
#   tools/setup.sh          runtime + everything the test suite drives (backends, qemu, fio...)
#   tools/setup.sh --demo   only what the demo mount needs (no Ceph/Swift/nginx)
#   tools/setup.sh --bench  the test set plus the FUSE peers tests/bench/bench_peers.py runs
set -euo pipefail
cd "$(dirname "$0")/.."

# attr and qemu-utils: getfattr and qemu-img, which the demo and the README use on the mount.
RUNTIME="fuse3 libfuse3-dev pkg-config python3 python3-dev python3-venv gcc attr qemu-utils"
TESTING="ceph-mon ceph-osd ceph-common radosgw python3-rados python3-rbd rbd-fuse
 swift swift-proxy swift-account swift-container swift-object memcached nginx-light
 qemu-utils fio rsync attr curl xfsprogs iproute2 procps
 python3-glance-store python3-boto3
 python3-cinder python3-cinderclient rabbitmq-server dmidecode
 mandoc systemd"
# FUSE peers the benchmarks compare imagefs with (rbd-fuse is in TESTING already)
BENCH="s3fs rclone"
want="$RUNTIME"
[ "${1:-}" = "--demo" ] || want="$RUNTIME $TESTING"
if [ "${1:-}" = "--bench" ]; then want="$want $BENCH"; fi

if [ "$(id -u)" != 0 ]; then
  echo "tools/setup.sh: run as root (it installs Debian packages and mounts FUSE)" >&2
  exit 2
fi

# Quiet unless something fails: a step's output is shown only when it exits non-zero.
quiet() {
  local out
  if ! out=$("$@" 2>&1); then
    printf '%s\n' "$out" >&2
    echo "tools/setup.sh: failed: $*" >&2
    exit 1
  fi
}

missing=$(for p in $want; do dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null \
  | grep -q "install ok installed" || echo "$p"; done)
if [ -n "$missing" ]; then
  echo "== apt-get install:" $missing
  export DEBIAN_FRONTEND=noninteractive
  quiet apt-get update -qq
  # shellcheck disable=SC2086
  quiet apt-get install -y -qq --no-install-recommends $missing
fi

# The Ceph bindings are Debian-only (not on PyPI). The venv sees just those two modules (a .pth
# naming a folder of links to them), not the rest of Debian's Python: the OpenStack packages
# the Glance and Cinder tests install there would change what swiftclient imports (keystoneclient,
# then eventlet, which hangs threads that imported it at their exit).
if [ ! -x .venv/bin/python ] || grep -qs "include-system-site-packages = true" .venv/pyvenv.cfg \
    || ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  rm -rf .venv
  /usr/bin/python3 -m venv .venv
fi
mkdir -p .venv/debian-bindings
for so in /usr/lib/python3/dist-packages/rados.cpython-*.so /usr/lib/python3/dist-packages/rbd.cpython-*.so; do
  if [ -e "$so" ]; then ln -sfn "$so" .venv/debian-bindings/; fi
done
echo "$PWD/.venv/debian-bindings" > "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/debian-bindings.pth"
if ! .venv/bin/python -c 'import imagefs, pyfuse3, trio, boto3, swiftclient, prometheus_client, xxhash, pytest' 2>/dev/null; then
  echo "== pip install"
  quiet .venv/bin/pip install -q --upgrade pip
  quiet .venv/bin/pip install -q -e '.[test]'
fi
modprobe fuse 2>/dev/null || true
# Commands where mount(8), fstab (type imagefs or fuse.imagefs) and systemd/imagefs@.service
# look for them: symlinks into this checkout's venv.
ln -sfn "$PWD/.venv/bin/imagefs" /usr/local/bin/imagefs
ln -sfn "$PWD/.venv/bin/mount.imagefs" /usr/sbin/mount.imagefs
# The manual pages, where man(1) and the unit's Documentation=man:imagefs(8) find them.
for page in man/*.[0-9]; do
  sect="${page##*.}"
  mkdir -p "/usr/local/share/man/man$sect"
  ln -sfn "$PWD/$page" "/usr/local/share/man/man$sect/$(basename "$page")"
done
echo "== setup done: $(.venv/bin/imagefs --version)"
