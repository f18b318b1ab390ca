#!/usr/bin/env bash
# Installs everything the build and the tests need on a fresh Debian 12 machine (as root).
# Idempotent: a second run installs nothing and downloads nothing.
#
#   thin-provisioning-tools  the real thin_check/thin_dump/thin_restore our metadata is tested against
#   fio                      IO workloads (benchmarks)
#   qemu-system-x86, busybox-static, cpio, dmsetup
#                            a real Linux kernel with dm-thin under qemu (fixtures/kernel/)
#   docker-registry, skopeo, umoci
#                            a real registry, and the tools that build and push the runtime's
#                            fixture images (busybox-static is their content)
#   runc, crun               external OCI runtimes thinbox hands bundles to (`run --runtime`)
#   libnbd-bin               nbdinfo and nbdcopy, real NBD clients for `dmtool serve`
#   xfsprogs, e2fsprogs, util-linux
#                            mkfs.xfs, mkfs.ext4, losetup and fstrim on activated thins
#   btrfs-progs              mkfs.btrfs and btrfs subvolumes for the cow benchmark's reflink peer
#   qemu-utils               qemu-img and qemu-io (NBD clients too), only if missing: the
#                            machine image ships them from backports, and apt must not touch those
#
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(thin-provisioning-tools fio qemu-system-x86 busybox-static cpio dmsetup libnbd-bin xfsprogs e2fsprogs util-linux btrfs-progs
          docker-registry skopeo umoci runc crun python3)
missing=()
for p in "${packages[@]}"; do
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)" = installed ] || missing+=("$p")
done
command -v qemu-io >/dev/null 2>&1 || missing+=(qemu-utils)
export DEBIAN_FRONTEND=noninteractive
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Installing Debian's qemu-system-x86 removes the machine image's backported qemu-utils (their
# versions conflict), so qemu-io is looked for again afterwards and Debian's own installed.
if ! command -v qemu-io >/dev/null 2>&1; then
  echo "setup: installing qemu-utils" >&2
  apt-get install -y -qq --no-install-recommends qemu-utils >/dev/null
fi

command -v cargo >/dev/null 2>&1 || export PATH="$HOME/.cargo/bin:$PATH"
command -v cargo >/dev/null 2>&1 || { echo "setup: cargo not found (install Rust with rustup)" >&2; exit 1; }

# The kernel used by the root_kernel_* tests: downloaded once into /var/cache/thinbox-kernel.
bash fixtures/kernel/prepare.sh
echo "setup: ready" >&2
