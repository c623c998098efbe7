"""Microsoft's Python IoTHubRegistryManager, pointed at `fleetsim run`'s embedded emulator, drives
fleetsim's own simulated devices: commands (sync, long-running, reboot) and writable properties."""

import time

from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import CloudToDeviceMethod, Twin, TwinProperties

from harness import HUB, WAIT, check, wait_until

rm = IoTHubRegistryManager.from_connection_string(HUB["service_connection_string"])


def connected(device_id):
    try:
        return rm.get_device(device_id).connection_state == "Connected"
    except Exception:
        return False


for d in ["env-sensor-0001", "dm-device-0001"]:
    wait_until(lambda: connected(d), f"{d} to connect")
check(True, "the fleet's devices are connected")


def call(device, name, payload=None):
    return rm.invoke_device_method(device, CloudToDeviceMethod(method_name=name, payload=payload, response_timeout_in_seconds=15))


r = call("env-sensor-0001", "blink", 2)
check(r.status == 200 and r.payload == {"description": "Blinking LED every 2 seconds"}, "blink answered")
r = call("env-sensor-0001", "turnoff")
check(r.status == 200, "turnoff answered")
r = call("env-sensor-0001", "rundiagnostics")
check(r.status == 202, "rundiagnostics answered 202")
wait_until(lambda: "rundiagnostics" in rm.get_twin("env-sensor-0001").properties.reported, "the long-running command to complete")
value = rm.get_twin("env-sensor-0001").properties.reported["rundiagnostics"]["value"]
check(value.startswith("Diagnostics run complete at "), "rundiagnostics completed by a reported property")

twin = rm.get_twin("env-sensor-0001")
updated = rm.update_twin("env-sensor-0001", Twin(properties=TwinProperties(desired={"brightness": 55})), twin.etag)
version = updated.properties.desired["$version"]


def acked():
    ack = rm.get_twin("env-sensor-0001").properties.reported.get("brightness", {})
    return ack.get("value") == 55 and ack.get("ac") == 200 and ack.get("av") == version


wait_until(acked, "the brightness acknowledgement")
check(True, "writable property acknowledged with the desired version")

r = call("dm-device-0001", "rebootDevice")
check(r.status == 200 and r.payload == {"Response": "This is the response from the device"}, "rebootDevice answered")
wait_until(lambda: "rebootTime" in rm.get_twin("dm-device-0001").properties.reported, "rebootTime after the reboot")
check(True, "the device came back and reported rebootTime")
