#!/usr/bin/env bash
# The whole test suite, as CI runs it: setup, formatting, the unprivileged tests, then the
# privileged ones (loop devices, mounts, a real kernel under qemu), one at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null 2>&1 || export PATH="$HOME/.cargo/bin:$PATH"

bash scripts/setup.sh
cargo fmt --all -- --check
cargo build --workspace --all-targets
# Unprivileged tests, in parallel.
cargo test --workspace -- --skip root_
# Privileged tests (named root_*): real kernels, mounts, loop devices; one at a time.
cargo test --workspace -- --test-threads=1 root_
# Fuzz targets (superblock and node decoders, whole damaged metadata images), briefly.
bash scripts/fuzz.sh
