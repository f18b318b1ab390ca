#!/usr/bin/env bash
# Sets up the machine, builds, and runs the main job:
# 1. thinbox's walkthrough on the default storage (/var/lib/thinbox, or $THINBOX_ROOT): a
#    local registry with a busybox image (built from busybox-static), pull, run a container
#    that installs a file, commit it with a new CMD, inspect, tag, push, remove everything
#    local, pull back, run the new default command, save, load on a fresh root, run again;
# 2. dmtool on the default pool (/var/lib/thinbox/pool, or $THINBOX_POOL): a thin volume, a
#    snapshot of it, a copy-on-write overwrite, both read back; then a thin activated as a
#    block device with ext4 on it (mounted, filled, trimmed, unmounted), the pool's status
#    and a metadata check.
# Safe to run again: the storage is reused and the job's own images, containers and thins
# are replaced.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null 2>&1 || export PATH="$HOME/.cargo/bin:$PATH"

bash scripts/setup.sh
cargo build --release -p dmtool -p runtime -p fixtures --bin dmtool --bin thinbox --bin demo-registry
thinbox=target/release/thinbox
root=${THINBOX_ROOT:-/var/lib/thinbox}
tb() { echo "+ thinbox $*" >&2; "$thinbox" --root "$root" "$@"; }

work=$(mktemp -d)
registry_pid=
cleanup_walkthrough() {
  "$thinbox" --root "$work/fresh" pool-daemon stop --force >/dev/null 2>&1 || true
  "$thinbox" --root "$root" pool-daemon stop --force >/dev/null 2>&1 || true
  # The registry and its docker-registry child are one process group.
  if [ -n "$registry_pid" ]; then
    kill -- "-$registry_pid" 2>/dev/null || true
    wait "$registry_pid" 2>/dev/null || true
    registry_pid=
  fi
  # Never into a filesystem something left mounted below.
  rm -rf --one-file-system "$work"
}
trap cleanup_walkthrough EXIT

setsid target/release/demo-registry "$work/registry" </dev/null >"$work/registry.out" &
registry_pid=$!
for _ in $(seq 600); do
  [ -s "$work/registry.out" ] && break
  kill -0 "$registry_pid" 2>/dev/null || break
  sleep 0.1
done
host=$(head -1 "$work/registry.out")
[ -n "$host" ] || { echo "the demo registry did not start" >&2; exit 1; }
busybox=$host/demo/busybox:latest
hello=$host/demo/hello:v1

# What an earlier run left (its registry had another port).
"$thinbox" --root "$root" rm -f walkthrough-builder >/dev/null 2>&1 || true
"$thinbox" --root "$root" images --format '{{.Repository}}:{{.Tag}}' 2>/dev/null \
  | grep -E '^127\.0\.0\.1:[0-9]+/demo/(busybox|hello):' \
  | xargs -r "$thinbox" --root "$root" rmi >/dev/null 2>&1 || true

tb pull "$busybox"
tb run --name walkthrough-builder "$busybox" sh -c 'echo hello from thinbox > /hello'
tb diff walkthrough-builder
tb commit -c 'CMD ["cat", "/hello"]' -m "add /hello" walkthrough-builder "$hello"
tb inspect --format '{{json .Config.Cmd}}' "$hello"
tb tag "$hello" "$host/demo/hello:latest"
tb push "$hello"
tb rm walkthrough-builder
tb rmi "$hello" "$host/demo/hello:latest" "$busybox"
tb images
tb pull "$hello"
[ "$(tb run --rm "$hello")" = "hello from thinbox" ] || { echo "the pulled image does not say hello" >&2; exit 1; }
echo "the committed image, pulled back, runs its new default command"
tb save -o "$work/hello.tar.gz" "$hello"
root=$work/fresh tb load -i "$work/hello.tar.gz"
[ "$(root=$work/fresh tb run --rm "$hello")" = "hello from thinbox" ] || { echo "the loaded image does not say hello" >&2; exit 1; }
echo "saved, loaded on a fresh root, and run again"
tb info
tb system df
# The pool daemon would keep serving (as dockerd does); the job leaves nothing running.
cleanup_walkthrough
trap - EXIT

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
