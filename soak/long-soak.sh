#!/usr/bin/env bash
# The long soak: an emulator with every fault on, 10,000 devices for an hour (override with
# DURATION=10m), RSS of both processes sampled every minute. Half-way, scheduled drops turn
# silent (the hub stops answering; only keep-alive notices) through the fault control route.
# Results: soak/results/long-soak-<date>.{json,rss.csv,hub-metrics.txt}. Exit status: the verdict.
set -euo pipefail
cd "$(dirname "$0")"
DURATION=${DURATION:-60m}
BIN=../target/release/fleetsim
OUT=results
STAMP=$(date -u +%Y%m%dT%H%M)
mkdir -p "$OUT"
(cd .. && cargo build --release --quiet)

"$BIN" hub --config hub-faults-10k.toml > "$OUT/long-soak-$STAMP.hub.log" 2>&1 &
HUB=$!
trap 'kill $HUB 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -s ../.fleetsim/soak-10k-hub/hub.json ] && grep -q "\"pid\": $HUB" ../.fleetsim/soak-10k-hub/hub.json && break; sleep 0.1; done

"$BIN" run --config soak-10k.toml --duration "$DURATION" --report "$OUT/long-soak-$STAMP.json" \
  > /dev/null 2> "$OUT/long-soak-$STAMP.fleet.log" &
FLEET=$!

rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
echo "elapsed_s,fleet_rss_kib,hub_rss_kib" > "$OUT/long-soak-$STAMP.rss.csv"
HUB_JSON=../.fleetsim/soak-10k-hub/hub.json
T0=$(date +%s)
case $DURATION in
  *h) SECS=$(( ${DURATION%h} * 3600 )) ;;
  *m) SECS=$(( ${DURATION%m} * 60 )) ;;
  *s) SECS=${DURATION%s} ;;
  *) SECS=$DURATION ;;
esac
HALF=$(( SECS / 2 ))
SWITCHED=0
while kill -0 $FLEET 2>/dev/null; do
  NOW=$(( $(date +%s) - T0 ))
  echo "$NOW,$(rss $FLEET),$(rss $HUB)" >> "$OUT/long-soak-$STAMP.rss.csv"
  if [ $SWITCHED = 0 ] && [ $NOW -ge $HALF ]; then
    TOKEN=$("$BIN" token --hub-json "$HUB_JSON")
    curl -sS --cacert ../.fleetsim/soak-10k-hub/ca.pem -X PATCH -H "authorization: $TOKEN" \
      -H 'content-type: application/json' -d '{"drop_mode":"silent"}' \
      "https://localhost:18443/emulator/faults?api-version=2021-04-12" > /dev/null
    SWITCHED=1
  fi
  sleep 60 & wait $! || true
done
set +e
wait $FLEET
VERDICT=$?
set -e
curl -sS http://127.0.0.1:19464/metrics > "$OUT/long-soak-$STAMP.hub-metrics.txt" || true
echo "verdict: $VERDICT (report: $OUT/long-soak-$STAMP.json)"
exit $VERDICT
