#!/usr/bin/env bash
# Block versus file copy-on-write, measured and drawn (benches/benches/cow.rs), as root:
# installs what it needs (scripts/setup.sh: fio, qemu-utils, btrfs-progs, xfsprogs), then
# writes benches/results/cow.md, cow.json and the SVG plots. Sizes, rounds and groups come
# from the environment (BENCH_COW_SIZES, BENCH_RUNS, BENCH_FILTER, ...: benches/README.md).
# A full run takes 20-30 minutes and needs about 15 GiB free in /var/tmp (BENCH_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
command -v cargo >/dev/null 2>&1 || export PATH="$HOME/.cargo/bin:$PATH"
echo "bench: load average $(cut -d' ' -f1-3 /proc/loadavg) (numbers from a busy machine spread more)" >&2
# The `runtime` group times the thinbox binary itself (found beside the bench, in the same
# target directory).
cargo build --release -p runtime
exec cargo bench -p benches --bench cow "$@"
