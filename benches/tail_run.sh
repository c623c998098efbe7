#!/bin/sh
# The `fleetsim tail` benchmark (BENCHMARKS.md), inside a fresh network namespace:
#   unshare -n sh benches/tail_run.sh FLEETSIM_BINARY EVENTS
# Starts an emulator that retains every event, fills its endpoint (tail_load.py), then times
# `fleetsim tail` reading them all as JSON lines and as text.
set -e
ip link set lo up
B=$1; N=$2; W=$(mktemp -d)
printf '[behaviour]\neventhub_retention_events = 1000000\n' > "$W/hub.toml"
"$B" hub --config "$W/hub.toml" --data-dir "$W/data" --mqtt-addr 127.0.0.1:0 --https-addr 127.0.0.1:0 \
  --amqp-addr 127.0.0.1:0 --no-metrics --log warn &
HUB=$!
for _ in $(seq 100); do [ -f "$W/data/hub.json" ] && break; sleep 0.1; done
python3 "$(dirname "$0")/tail_load.py" "$W/data/hub.json" "$N" 20
/usr/bin/time -f "tail json: %e s wall, %U s user, %S s sys, %M KB max RSS" \
  "$B" tail --hub-json "$W/data/hub.json" --from earliest --count "$N" --json > "$W/out.jsonl"
wc -l < "$W/out.jsonl"
/usr/bin/time -f "tail text: %e s wall, %U s user, %S s sys" \
  "$B" tail --hub-json "$W/data/hub.json" --from earliest --count "$N" > /dev/null
kill $HUB
rm -rf "$W"
