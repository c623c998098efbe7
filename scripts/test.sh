#!/usr/bin/env bash
# The one command that runs every test: installs Microsoft's SDK clients for the conformance tests
# (idempotent), then runs the unit, integration and conformance tests. Needs root for the network
# namespaces the conformance tests use (unshare -n).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-sdks.sh
cargo test --locked --all-targets "$@"
