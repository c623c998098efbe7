#!/usr/bin/env bash
# The one command that runs every test: installs Microsoft's SDK clients for the conformance tests
# (idempotent), then runs the unit, integration and conformance tests. Needs root for the network
# namespaces the conformance tests use (unshare -n).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-sdks.sh
log=$(mktemp)
set +e
cargo test --locked --all-targets --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line with the totals, after the benches' smoke output.
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
rm -f "$log"
exit "$status"
