#!/usr/bin/env bash
# Sets up the machine, builds, and runs the main job on the default pool
# (/var/lib/thinbox/pool, or $THINBOX_POOL): a thin volume, a snapshot of it, a
# copy-on-write overwrite, both read back, the pool's status and a metadata check.
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
for id in 1 2; do $dmtool thin delete --pool "$pool" $id 2>/dev/null || true; done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
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
$dmtool thin ls --pool "$pool"
$dmtool pool status --pool "$pool"
$dmtool check "$pool/metadata"
