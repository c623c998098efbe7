#!/usr/bin/env bash
# Fuzzes every target for a bounded time (FUZZ_SECS each, default 120) with the corpus kept in
# fuzz/corpus/<target>, which grows with what libFuzzer finds interesting. cargo-fuzz needs
# nightly flags; RUSTC_BOOTSTRAP lets the one stable toolchain here accept them.
#   cargo install cargo-fuzz --locked && fuzz/run.sh [target ...]
set -euo pipefail
cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1
SECS=${FUZZ_SECS:-120}
TARGETS=("$@")
[ ${#TARGETS[@]} -eq 0 ] && TARGETS=(mqtt_session topics credentials scenario rest device_rest)
cargo fuzz build -O
for t in "${TARGETS[@]}"; do
  echo "== $t ($SECS s)"
  cargo fuzz run -O "$t" "corpus/$t" -- -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 2>&1 | tail -4
done
