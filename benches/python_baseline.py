"""Baseline: the fleet people would otherwise write, with Microsoft's azure-iot-device SDK (one
asyncio IoTHubDeviceClient per device, QoS 1 telemetry every INTERVAL seconds) against a
`fleetsim hub`. Reports connect time, memory per device and CPU per device, and whether the
clients kept up with their send schedule. Run it through the namespace runner, since the
Python client can only dial port 8883:

    tests/conformance/run-in-netns.sh target/release/fleetsim "$(mktemp -d)" \\
        .venv/bin/python benches/python_baseline.py --devices 500 --interval 10 --steady 30
"""

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import random
import resource
import time
import urllib.parse

import requests
from azure.iot.device import Message
from azure.iot.device.aio import IoTHubDeviceClient

p = argparse.ArgumentParser()
p.add_argument("--devices", type=int, default=100)
p.add_argument("--interval", type=float, default=10.0)
p.add_argument("--steady", type=float, default=30.0)
p.add_argument("--connect-concurrency", type=int, default=50)
a = p.parse_args()

hub = json.load(open(os.environ["HUB_JSON"]))
ca = open(hub["ca_file"]).read()
svc = dict(x.split("=", 1) for x in hub["service_connection_string"].split(";"))


def sas(resource_uri, key, policy=None):
    se = int(time.time()) + 3600
    sr = urllib.parse.quote(resource_uri, safe="")
    sig = base64.b64encode(hmac.new(base64.b64decode(key), f"{sr}\n{se}".encode(), hashlib.sha256).digest()).decode()
    return f"SharedAccessSignature sr={sr}&sig={urllib.parse.quote(sig, safe='')}&se={se}" + (f"&skn={policy}" if policy else "")


def cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


key = base64.b64encode(os.urandom(32)).decode()
session = requests.Session()
token = sas(hub["hostname"], svc["SharedAccessKey"], "iothubowner")
for i in range(a.devices):
    body = {"deviceId": f"py-{i:06}", "authentication": {"type": "sas", "symmetricKey": {"primaryKey": key, "secondaryKey": key}}}
    r = session.put(f"https://{svc['HostName']}/devices/py-{i:06}", params={"api-version": "2021-04-12"}, json=body, headers={"Authorization": token})
    r.raise_for_status()

sent = 0
acked = 0
late = 0
connected = 0
failed_connects = 0
latencies = []


async def device(i, start_gate, stop):
    global sent, acked, late, connected, failed_connects
    cs = f"HostName={hub['hostname']};DeviceId=py-{i:06};SharedAccessKey={key}"
    client = IoTHubDeviceClient.create_from_connection_string(cs, server_verification_cert=ca)
    async with start_gate:
        try:
            await client.connect()
        except Exception:
            # Where the SDK stops keeping up, this is the first sign: its connect times out.
            failed_connects += 1
            await client.shutdown()
            return
    connected += 1
    next_at = time.monotonic() + random.random() * a.interval
    while not stop.is_set():
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        if time.monotonic() - next_at > a.interval / 2:
            late += 1
        t = time.monotonic()
        sent += 1
        await client.send_message(Message(json.dumps({"temp": 20 + random.random(), "seq": sent})))
        acked += 1
        latencies.append(time.monotonic() - t)
        next_at += a.interval
    await client.shutdown()


async def main():
    rss0 = rss_kib()
    gate = asyncio.Semaphore(a.connect_concurrency)
    stop = asyncio.Event()
    t0 = time.monotonic()
    tasks = [asyncio.create_task(device(i, gate, stop)) for i in range(a.devices)]
    # A client whose connect neither succeeds nor fails would hold the run for ever: bound it.
    deadline = time.monotonic() + 120
    while connected + failed_connects < a.devices and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    connect_secs = time.monotonic() - t0
    await asyncio.sleep(2)
    cpu0, acked0, lat0 = cpu_seconds(), acked, len(latencies)
    await asyncio.sleep(a.steady)
    cpu1, acked1 = cpu_seconds(), acked
    rss = rss_kib()
    window = sorted(latencies[lat0:])
    stop.set()
    await asyncio.wait(tasks, timeout=30)
    cores = (cpu1 - cpu0) / a.steady
    report = {
        "client": "azure-iot-device (Python, asyncio)",
        "devices": a.devices,
        "connected": connected,
        "failed_connects": failed_connects,
        "still_connecting_after_120s": a.devices - connected - failed_connects,
        "interval_secs": a.interval,
        "connect_secs": round(connect_secs, 2),
        "rss_kib_per_device": round((rss - rss0) / max(1, connected), 1),
        "rss_mib": rss // 1024,
        "steady_msgs_per_sec": round((acked1 - acked0) / a.steady, 1),
        "expected_msgs_per_sec": round(a.devices / a.interval, 1),
        "cpu_cores": round(cores, 3),
        "devices_per_core": round(connected / cores) if cores > 0 else None,
        "cpu_us_per_acked": round((cpu1 - cpu0) * 1e6 / max(1, acked1 - acked0), 1),
        "send_p50_ms": round(window[len(window) // 2] * 1e3, 2) if window else None,
        "send_p99_ms": round(window[int(len(window) * 0.99)] * 1e3, 2) if window else None,
        "late_sends": late,
    }
    print(json.dumps(report))
    print("ok: baseline measured")


asyncio.run(main())
