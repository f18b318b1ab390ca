#!/usr/bin/env bash
# Sets up the machine, builds, and runs the main job on the default pool
# (/var/lib/thinbox/pool, or $THINBOX_POOL): a thin volume, a snapshot of it, a
# copy-on-write overwrite, both read back; then a thin activated as a block device with
# ext4 on it (mounted, filled, trimmed, unmounted), the pool's status and a metadata check.
# Safe to run again: the pool is reused and the job's own thins are replaced.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null 2>&1 || export PATH="$HOME/.cargo/bin:$PATH"

bash scripts/setup.sh
cargo build --release -p dmtool
dmtool=target/release/dmtool
pool=${THINBOX_POOL:-/var/lib/thinbox/pool}

if [ ! -e "$pool/metadata" ]; then
  # Docker's loop-lvm defaults: sparse files, 100 GiB of data, 2 GiB of metadata.
  $dmtool pool create --pool "$pool" --data-size 100G --metadata-size 2G
fi
# A daemon left running by an interrupted earlier run owns the pool: stop it first.
$dmtool pool stop --pool "$pool" --force 2>/dev/null || true
for id in 1 2 3; do $dmtool thin delete --pool "$pool" $id 2>/dev/null || true; done

work=$(mktemp -d)
cleanup() {
  mountpoint -q "$work/mnt" 2>/dev/null && umount "$work/mnt"
  $dmtool pool stop --pool "$pool" --force 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
head -c $((64 << 20)) /dev/urandom >"$work/image"
$dmtool thin create --pool "$pool" 1 --size 1G --name demo
$dmtool thin write --pool "$pool" 1 --input "$work/image"
$dmtool thin snap --pool "$pool" 2 1 --name demo-snap
# Overwrite 4 KiB of the origin: one 64 KiB block is copied, nothing else.
head -c 4096 /dev/urandom | $dmtool thin write --pool "$pool" 1 --offset $((10 << 20))
$dmtool thin read --pool "$pool" 2 --length $((64 << 20)) | cmp - "$work/image"
echo "snapshot 2 still holds the original 64 MiB"
$dmtool thin read --pool "$pool" 1 --length $((64 << 20)) | cmp -s - "$work/image" \
  && { echo "the origin should differ" >&2; exit 1; }
echo "origin 1 has the new 4 KiB"

# A thin as a block device (the pool daemon: FUSE file + loop device), with ext4 on it.
$dmtool thin create --pool "$pool" 3 --size 4G --name demo-fs
dev=$($dmtool thin activate --pool "$pool" 3)
echo "thin 3 is $dev"
mkfs.ext4 -q "$dev"
mkdir -p "$work/mnt" && mount "$dev" "$work/mnt"
head -c $((256 << 20)) /dev/urandom >"$work/mnt/data" && sync -f "$work/mnt/data"
$dmtool thin ls --pool "$pool"
rm "$work/mnt/data" && sync -f "$work/mnt" && fstrim -v "$work/mnt"
umount "$work/mnt"
$dmtool thin deactivate --pool "$pool" 3
$dmtool pool status --pool "$pool"
$dmtool pool stop --pool "$pool"
$dmtool thin ls --pool "$pool"
$dmtool check "$pool/metadata"
