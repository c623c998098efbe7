#!/usr/bin/env python3
"""Fills a running emulator's Event Hubs-compatible endpoint for the `fleetsim tail` benchmark.

Creates DEVICES devices through the service API and posts EVENTS telemetry messages in HTTPS
batches (the device API's `application/vnd.microsoft.iothub.json`), each with an application
property, so that `fleetsim tail --from earliest --count EVENTS` then measures reading and printing
alone. Standard library only. Usage: tail_load.py HUB_JSON EVENTS [DEVICES]
"""

import base64
import hashlib
import hmac
import http.client
import json
import ssl
import sys
import time
import urllib.parse


def sas(resource, key_b64, policy=None, ttl=3600):
    expiry = int(time.time()) + ttl
    sr = urllib.parse.quote(resource, safe="")
    sig = base64.b64encode(hmac.new(base64.b64decode(key_b64), f"{sr}\n{expiry}".encode(), hashlib.sha256).digest())
    token = f"SharedAccessSignature sr={sr}&sig={urllib.parse.quote(sig, safe='')}&se={expiry}"
    return token + (f"&skn={policy}" if policy else "")


def main():
    info = json.load(open(sys.argv[1]))
    events, devices = int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 20
    cs = dict(p.split("=", 1) for p in info["service_connection_string"].split(";"))
    host = cs["HostName"].split(":")[0]
    ctx = ssl.create_default_context(cafile=info["ca_file"])
    addr = info["https_addr"].rsplit(":", 1)
    conn = http.client.HTTPSConnection(addr[0], int(addr[1]), context=ctx)
    conn._context.check_hostname = False  # the certificate names the hub's host, we dial its address
    service = sas(host, cs["SharedAccessKey"], cs["SharedAccessKeyName"])
    keys = []
    for d in range(devices):
        conn.request("PUT", f"/devices/tail-{d}?api-version=2021-04-12", json.dumps({"deviceId": f"tail-{d}"}),
                     {"Authorization": service, "Content-Type": "application/json"})
        r = conn.getresponse()
        body = json.loads(r.read())
        keys.append(body["authentication"]["symmetricKey"]["primaryKey"])
    per_batch, sent, t0 = 500, 0, time.time()
    while sent < events:
        d = (sent // per_batch) % devices
        n = min(per_batch, events - sent)
        batch = [{"body": base64.b64encode(json.dumps({"t": 21.5, "n": sent + i}).encode()).decode(),
                  "properties": {"iothub-app-site": "bench"}} for i in range(n)]
        conn.request("POST", f"/devices/tail-{d}/messages/events?api-version=2021-04-12", json.dumps(batch),
                     {"Authorization": sas(f"{host}/devices/tail-{d}", keys[d]),
                      "Content-Type": "application/vnd.microsoft.iothub.json"})
        r = conn.getresponse()
        r.read()
        if r.status not in (200, 204):
            sys.exit(f"batch refused: {r.status}")
        sent += n
    print(f"{sent} events in {time.time() - t0:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
