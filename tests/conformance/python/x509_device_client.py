"""Microsoft's Python IoTHubDeviceClient with X.509 certificates against the emulator: a
self-signed device registered by thumbprint and a CA-signed device whose root CA is uploaded
verified, each created with IoTHubRegistryManager, connect with create_from_x509_certificate,
send telemetry, get the twin and answer a direct method. A certificate signed by another CA and
an expired one are refused (CONNACK 5, counted by reason in the hub's metrics). The certificates
come from the Rust test (X509_DIR)."""

import os
import threading
import time

import requests
from azure.iot.device import X509, IoTHubDeviceClient, Message, MethodResponse
from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import CloudToDeviceMethod

from harness import CA_PEM, HUB, SERVICE, WAIT, check, emulator_get, sas

CERTS = os.environ["X509_DIR"]


def path(name):
    return os.path.join(CERTS, name)


def x509(name):
    return X509(cert_file=path(f"{name}.pem"), key_file=path(f"{name}.key.pem"))


def client(device_id, name, **kwargs):
    return IoTHubDeviceClient.create_from_x509_certificate(
        x509(name), HUB["hostname"], device_id, server_verification_cert=CA_PEM, **kwargs
    )


def refused(reason):
    text = requests.get(HUB["metrics_url"], timeout=WAIT).text
    line = f'fleetsim_hub_connections_refused_total{{reason="{reason}"}} '
    return next((float(l[len(line):]) for l in text.splitlines() if l.startswith(line)), 0.0)


def refusals():
    text = requests.get(HUB["metrics_url"], timeout=WAIT).text
    return [l for l in text.splitlines() if l.startswith("fleetsim_hub_connections_refused_total") and not l.endswith(" 0")]


registry = IoTHubRegistryManager.from_connection_string(HUB["service_connection_string"])


def exercise(device_id, name):
    """Connects, sends telemetry, gets the twin and answers a method, as device_id with cert name."""
    c = client(device_id, name)
    answered = threading.Event()

    def on_method(request):
        answered.set()
        c.send_method_response(MethodResponse.create_from_method_request(request, 200, {"echo": request.payload}))

    c.on_method_request_received = on_method
    c.connect()
    check(c.connected, f"{device_id}: connected with its X.509 certificate")
    c.send_message(Message(f"hello from {device_id}"))
    events = emulator_get(f"/emulator/devices/{device_id}/messages/events")
    check(events["received"] == 1 and events["messages"][0]["body"] == f"hello from {device_id}", f"{device_id}: telemetry arrived")
    twin = c.get_twin()
    check(twin["desired"]["$version"] == 1, f"{device_id}: twin get")
    result = registry.invoke_device_method(device_id, CloudToDeviceMethod(method_name="ping", payload=7, response_timeout_in_seconds=15))
    check(answered.is_set(), f"{device_id}: method request received")
    check(result.status == 200 and result.payload == {"echo": 7}, f"{device_id}: method answered ({result.status}, {result.payload})")
    c.shutdown()


# Self-signed, registered by its thumbprints (SHA-1 primary, SHA-256 secondary).
sha1 = open(path("ss.sha1")).read().strip()
sha256 = open(path("ss.sha256")).read().strip()
dev = registry.create_device_with_x509("x509-ss", sha1, sha256, "enabled")
check(dev.authentication.type == "selfSigned", "self-signed device created with its thumbprints")
check(dev.authentication.x509_thumbprint.primary_thumbprint == sha1, "the primary thumbprint is kept as given")
exercise("x509-ss", "ss")
ws = client("x509-ss", "ss", websockets=True)
ws.connect()
ws.send_message(Message("over websockets"))
check(emulator_get("/emulator/devices/x509-ss/messages/events")["received"] == 2, "x509-ss: telemetry over MQTT over WebSockets")
ws.shutdown()

# CA-signed: the root uploaded (verified at upload, as Azure's isVerified allows), the device
# registered as certificateAuthority.
token = sas(HUB["hostname"], SERVICE["SharedAccessKey"], "iothubowner")
r = requests.put(
    f"https://{SERVICE['HostName']}/certificates/conformance-root",
    params={"api-version": "2021-04-12"},
    headers={"Authorization": token},
    json={"properties": {"certificate": open(path("root.pem")).read(), "isVerified": True}},
    timeout=WAIT,
)
check(r.status_code == 201 and r.json()["properties"]["isVerified"] is True, "root CA uploaded, verified")
dev = registry.create_device_with_certificate_authority("x509-ca", "enabled")
check(dev.authentication.type == "certificateAuthority", "CA device created")
exercise("x509-ca", "ca-dev")

# Refused: a certificate for the same device signed by another CA, and an expired one.
for name, reason in [("wrong", "cert_untrusted"), ("expired", "cert_expired")]:
    bad = client("x509-ca", name, connection_retry=False)
    try:
        bad.connect()
        connected = bad.connected
    except Exception as e:  # the SDK's CredentialError or ConnectionFailedError, by version
        print(f"{name}: connect raised {type(e).__name__}", flush=True)
        connected = False
    check(not connected, f"{name} certificate refused")
    deadline = time.time() + WAIT
    while refused(reason) < 1 and time.time() < deadline:
        time.sleep(0.1)
    check(refused(reason) >= 1, f"the refusal counted as {reason} (refused: {refusals()})")
    bad.shutdown()
