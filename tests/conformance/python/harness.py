"""Shared helpers for the Python conformance scripts: where the emulator is (hub.json), a service
token for the emulator-only routes, and bounded waits so that a missing answer fails the script
instead of hanging it."""

import base64
import hashlib
import hmac
import json
import os
import sys
import threading
import time
import urllib.parse

import requests

WAIT = 20.0

HUB = json.load(open(os.environ["HUB_JSON"]))
CA_PEM = open(HUB["ca_file"]).read()


def parse_cs(cs):
    return dict(part.split("=", 1) for part in cs.split(";"))


SERVICE = parse_cs(HUB["service_connection_string"])


def sas(resource, key_b64, policy=None, ttl=3600):
    expiry = int(time.time()) + ttl
    sr = urllib.parse.quote(resource, safe="")
    sig = base64.b64encode(hmac.new(base64.b64decode(key_b64), f"{sr}\n{expiry}".encode(), hashlib.sha256).digest()).decode()
    token = f"SharedAccessSignature sr={sr}&sig={urllib.parse.quote(sig, safe='')}&se={expiry}"
    return token + (f"&skn={policy}" if policy else "")


def derive_key(group_key_b64, registration_id):
    return base64.b64encode(hmac.new(base64.b64decode(group_key_b64), registration_id.encode(), hashlib.sha256).digest()).decode()


def emulator_get(path):
    """GET a service or emulator route as iothubowner, as raw JSON."""
    token = sas(HUB["hostname"], SERVICE["SharedAccessKey"], "iothubowner")
    url = f"https://{SERVICE['HostName']}{path}"
    r = requests.get(url, headers={"Authorization": token}, params={"api-version": "2021-04-12"}, timeout=WAIT)
    r.raise_for_status()
    return r.json()


def device_cs(device_id, key, module_id=None):
    cs = f"HostName={HUB['hostname']};DeviceId={device_id};SharedAccessKey={key}"
    return cs + (f";ModuleId={module_id}" if module_id else "")


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}", flush=True)
        sys.exit(1)
    print(f"ok: {what}", flush=True)


class Box:
    """A value another thread delivers, waited for with a bound."""

    def __init__(self):
        self.event = threading.Event()
        self.value = None

    def put(self, value):
        self.value = value
        self.event.set()

    def get(self, what):
        if not self.event.wait(WAIT):
            print(f"FAIL: timed out waiting for {what}", flush=True)
            sys.exit(1)
        return self.value


def wait_until(predicate, what):
    deadline = time.time() + WAIT
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    print(f"FAIL: timed out waiting for {what}", flush=True)
    sys.exit(1)
