#!/usr/bin/env bash
# Runs a command against a fresh `fleetsim hub` inside a private network namespace, where the fixed
# ports Microsoft's clients dial (8883, 443) are free; so conformance tests can run in parallel.
# usage: run-in-netns.sh FLEETSIM DATA_DIR COMMAND [ARGS...]
# With FLEETSIM_RUN_CONFIG set, `fleetsim run --config $FLEETSIM_RUN_CONFIG` (a fleet with its
# embedded hub, whose data_dir must be DATA_DIR) is started instead of `fleetsim hub`.
# The command sees HUB_JSON (the hub.json) and FLEETSIM (the binary, for tool commands).
# FLEETSIM_HUB_ARGS adds flags to `fleetsim hub` (for example `--log debug` while investigating).
set -euo pipefail
fleetsim=$1
dir=$2
shift 2
exec unshare --net -- bash -c '
    set -u
    fleetsim=$1; dir=$2; shift 2
    ip link set lo up
    if [ -n "${FLEETSIM_RUN_CONFIG:-}" ]; then
        "$fleetsim" run --config "$FLEETSIM_RUN_CONFIG" >"$dir/hub.log" 2>&1 &
    else
        "$fleetsim" hub --data-dir "$dir" --mqtt-addr 127.0.0.1:8883 --https-addr 127.0.0.1:443 --amqp-addr 127.0.0.1:5671 ${FLEETSIM_HUB_ARGS:-} \
            --metrics-addr 127.0.0.1:9464 >"$dir/hub.log" 2>&1 &
    fi
    hub=$!
    for _ in $(seq 1 200); do
        [ -s "$dir/hub.json" ] && break
        kill -0 "$hub" 2>/dev/null || { echo "hub exited early:"; cat "$dir/hub.log"; exit 1; }
        sleep 0.05
    done
    [ -s "$dir/hub.json" ] || { echo "hub did not write hub.json"; cat "$dir/hub.log"; exit 1; }
    export FLEETSIM="$fleetsim" HUB_JSON="$dir/hub.json" REQUESTS_CA_BUNDLE="$dir/ca.pem" SSL_CERT_FILE="$dir/ca.pem" NODE_EXTRA_CA_CERTS="$dir/ca.pem"
    set +e
    "$@"
    rc=$?
    kill -TERM "$hub"
    wait "$hub"
    hub_rc=$?
    if [ "$rc" -ne 0 ]; then echo "--- hub log ---"; tail -n 50 "$dir/hub.log"; fi
    [ "$hub_rc" -eq 0 ] || echo "hub exited with $hub_rc on SIGTERM"
    exit $(( rc != 0 ? rc : hub_rc ))
' bash "$fleetsim" "$dir" "$@"
