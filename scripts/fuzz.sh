#!/usr/bin/env bash
# Runs every fuzz target for a while (default 20 s each; FUZZ_SECONDS to change), as CI does.
# cargo-fuzz needs nightly-only sanitizer flags; RUSTC_BOOTSTRAP=1 lets the one stable
# toolchain here accept them.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
command -v cargo >/dev/null 2>&1 || export PATH="$HOME/.cargo/bin:$PATH"
seconds=${FUZZ_SECONDS:-20}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
for target in $(cargo fuzz list); do
  echo "fuzz: $target for ${seconds}s" >&2
  cargo fuzz run -O "$target" -- -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 2>&1 \
    | grep -E '^(#[0-9]+[[:space:]]+DONE|Done|==[0-9]+==ERROR|SUMMARY)' || true
  # A finding leaves an artifact and fails the run.
  if compgen -G "artifacts/$target/*" >/dev/null; then
    echo "fuzz: $target found a failure: $(ls artifacts/$target)" >&2
    exit 1
  fi
done
