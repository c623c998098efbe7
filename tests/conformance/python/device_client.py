"""Microsoft's Python IoTHubDeviceClient against the emulator: connect (MQTT and MQTT over
WebSockets, with a Plug and Play model id), telemetry with properties, twin get, reported patch,
desired patch received, a direct method answered. The service side is IoTHubRegistryManager."""

import json
import threading

from azure.iot.device import IoTHubDeviceClient, Message, MethodResponse
from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import CloudToDeviceMethod, Twin, TwinProperties

from harness import CA_PEM, HUB, Box, check, device_cs, emulator_get, wait_until

MODEL = "dtmi:com:example:Thermostat;1"

registry = IoTHubRegistryManager.from_connection_string(HUB["service_connection_string"])
dev = registry.create_device_with_sas("py-dev-1", "", "", "enabled")
key = dev.authentication.symmetric_key.primary_key
check(bool(key), "the hub generated keys for a device created without them")

client = IoTHubDeviceClient.create_from_connection_string(device_cs("py-dev-1", key), server_verification_cert=CA_PEM, product_info=MODEL)
desired = Box()
client.on_twin_desired_properties_patch_received = desired.put


def on_method(request):
    payload = {"description": f"Blinking LED every {request.payload} seconds"}
    client.send_method_response(MethodResponse.create_from_method_request(request, 200, payload))


client.on_method_request_received = on_method
client.connect()
check(client.connected, "device connected over MQTT/TLS")

msg = Message(json.dumps({"temp": 22.5, "humid": 40}))
msg.message_id = "m-1"
msg.content_type = "application/json"
msg.content_encoding = "utf-8"
msg.custom_properties["alert"] = "high temp"
client.send_message(msg)
events = emulator_get("/emulator/devices/py-dev-1/messages/events")
first = events["messages"][0]
check(json.loads(first["body"]) == {"temp": 22.5, "humid": 40}, "telemetry body arrived")
check(first["systemProperties"]["message-id"] == "m-1", "message id arrived")
check(first["systemProperties"]["content-type"] == "application/json", "content type arrived")
check(first["properties"]["alert"] == "high temp", "custom property arrived")
check(first["systemProperties"].get("dt-dataschema") == MODEL, "model id announced in the username reached the message")

twin = client.get_twin()
check(twin["desired"]["$version"] == 1 and twin["reported"]["$version"] == 1, "twin get returned both sections with versions")
client.patch_twin_reported_properties({"state": True, "firmware": {"version": "1.2.3"}})
service_twin = registry.get_twin("py-dev-1")
check(service_twin.properties.reported["state"] is True, "reported patch visible to the service")
# azure-iot-hub 2.7.0's Twin model predates modelId, so read the raw twin JSON.
check(emulator_get("/twins/py-dev-1")["modelId"] == MODEL, "the twin shows the model id")

registry.update_twin("py-dev-1", Twin(properties=TwinProperties(desired={"brightness": 5})), service_twin.etag)
patch = desired.get("desired patch")
check(patch.get("brightness") == 5 and patch.get("$version") == 2, "desired patch received with $version")

result = registry.invoke_device_method("py-dev-1", CloudToDeviceMethod(method_name="blink", payload=3, response_timeout_in_seconds=15))
check(result.status == 200, "method answered with status 200")
check(result.payload == {"description": "Blinking LED every 3 seconds"}, "method payload returned to the service")

# The same device over MQTT over WebSockets (port 443). The first client goes first: two live
# clients of one identity keep replacing each other, on Azure as here.
client.shutdown()
ws = IoTHubDeviceClient.create_from_connection_string(device_cs("py-dev-1", key), server_verification_cert=CA_PEM, websockets=True)
ws.connect()
ws.send_message(Message("over websockets"))
wait_until(lambda: emulator_get("/emulator/devices/py-dev-1/messages/events")["received"] == 2, "websocket telemetry")
check(True, "telemetry over MQTT over WebSockets")
ws.shutdown()
registry.delete_device("py-dev-1")
check(True, "device deleted")
