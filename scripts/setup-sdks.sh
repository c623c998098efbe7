#!/usr/bin/env bash
# Installs what the conformance and browser tests drive: Microsoft's Python SDKs in .venv, the Node
# SDKs in tests/conformance/node/node_modules, and Debian's chromium and chromium-driver. Idempotent:
# a stamp records what was installed, so a second run costs nothing. Needs python3 (with venv) and
# npm; installs python3-venv via apt if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

req=tests/conformance/python/requirements.txt
pkg=tests/conformance/node/package.json

need=()
command -v unshare >/dev/null || need+=(util-linux)
command -v ip >/dev/null || need+=(iproute2)
command -v node >/dev/null && command -v npm >/dev/null || need+=(nodejs npm)
# The console and HTML-report browser tests drive Debian's headless Chromium through WebDriver.
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
if [ ${#need[@]} -gt 0 ]; then
    echo "setup-sdks: installing ${need[*]}" >&2
    apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
fi

if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    echo "setup-sdks: installing python3-venv" >&2
    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
fi

stamp=.venv/.fleetsim-stamp
want=$(sha256sum "$req" | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup-sdks: creating .venv with Microsoft's Python SDKs" >&2
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check -r "$req"
    echo "$want" > "$stamp"
fi

nstamp=tests/conformance/node/node_modules/.fleetsim-stamp
lock=tests/conformance/node/package-lock.json
nwant=$( { cat "$pkg"; [ -f "$lock" ] && cat "$lock" || true; } | sha256sum | cut -d' ' -f1)
if [ ! -d tests/conformance/node/node_modules ] || [ "$(cat "$nstamp" 2>/dev/null)" != "$nwant" ]; then
    echo "setup-sdks: installing Microsoft's Node SDKs" >&2
    if [ -f "$lock" ]; then
        (cd tests/conformance/node && npm ci --silent --no-audit --no-fund)
    else
        (cd tests/conformance/node && npm install --silent --no-audit --no-fund)
    fi
    echo "$nwant" > "$nstamp"
fi
