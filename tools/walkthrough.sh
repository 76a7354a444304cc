#!/usr/bin/env bash
# The operator walkthrough, as commands: configure two stores, check the config and the
# stores, mount through an fstab line with `mount -a`, copy an image between the stores (cp
# and `imagefs copy`, verified), look at `imagefs status`, unmount with umount(8).
# Run as root after tools/setup.sh (it links imagefs and mount.imagefs where mount(8) finds
# them). Everything lives under DIR (default: a new temporary directory); a real host would
# use /etc/imagefs/images.toml, /etc/fstab and /var/lib/imagefs instead.
#   tools/walkthrough.sh [DIR]
set -euo pipefail
dir=${1:-$(mktemp -d /tmp/imagefs-walkthrough.XXXXXX)}
mkdir -p "$dir"/fast "$dir"/archive "$dir"/mnt
say() { printf '\n== %s\n' "$*"; }

say "configure two stores"
cat > "$dir/images.toml" <<EOF
[cache]
dir = "$dir/cache"
memory_size = "32MiB"
disk_size = "64MiB"

[stores.fast]
type = "file"
path = "$dir/fast"
description = "SSD tier"
default = true

[stores.archive]
type = "file"
path = "$dir/archive"
description = "archive tier"
EOF
head -c $((8 << 20)) /dev/urandom > "$dir/fast/disk.raw"

say "check the config and reach every store"
imagefs check-config "$dir/images.toml" --connect

say "mount it from an fstab line with mount -a"
echo "$dir/images.toml $dir/mnt fuse.imagefs _netdev,allow_other,x-systemd.automount 0 0" > "$dir/fstab"
mount -a -T "$dir/fstab"
trap 'umount "$dir/mnt" 2>/dev/null || true' EXIT
ls -l "$dir/mnt" "$dir/mnt/fast"

say "copy an image between the stores"
cp "$dir/mnt/fast/disk.raw" "$dir/mnt/archive/disk-cp.raw"
cmp "$dir/fast/disk.raw" "$dir/mnt/archive/disk-cp.raw"
imagefs copy "$dir/mnt/fast/disk.raw" --to archive
imagefs verify "$dir/mnt/archive/disk.raw"
imagefs stores "$dir/mnt"

say "what the mount did"
imagefs status "$dir/mnt"

say "unmount"
umount "$dir/mnt"
trap - EXIT
echo "walkthrough done in $dir"
