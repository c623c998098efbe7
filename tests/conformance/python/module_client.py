"""Microsoft's Python IoTHubModuleClient against the emulator: connect, telemetry to an output,
twin get, reported patch, desired patch received, module method answered."""

import json

from azure.iot.device import IoTHubModuleClient, Message, MethodResponse
from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import CloudToDeviceMethod, Twin, TwinProperties

from harness import CA_PEM, HUB, Box, check, device_cs, emulator_get

registry = IoTHubRegistryManager.from_connection_string(HUB["service_connection_string"])
registry.create_device_with_sas("py-edge-1", "", "", "enabled")
mod = registry.create_module_with_sas("py-edge-1", "filterModule", None, "", "")
key = mod.authentication.symmetric_key.primary_key

client = IoTHubModuleClient.create_from_connection_string(device_cs("py-edge-1", key, "filterModule"), server_verification_cert=CA_PEM)
desired = Box()
client.on_twin_desired_properties_patch_received = desired.put
client.on_method_request_received = lambda req: client.send_method_response(MethodResponse.create_from_method_request(req, 200, {"reset": True}))
client.connect()
check(client.connected, "module connected")

msg = Message(json.dumps({"machine": {"temperature": 31.0}}))
msg.custom_properties["MessageType"] = "Alert"
client.send_message_to_output(msg, "output1")
events = emulator_get("/emulator/devices/py-edge-1/modules/filterModule/messages/events")
check(events["messages"][0]["systemProperties"]["output-name"] == "output1", "module telemetry to an output")
check(events["messages"][0]["properties"]["MessageType"] == "Alert", "module message property")

twin = client.get_twin()
check(twin["desired"]["$version"] == 1, "module twin get")
client.patch_twin_reported_properties({"TemperatureThreshold": {"value": 25}})
mtwin = registry.get_module_twin("py-edge-1", "filterModule")
check(mtwin.properties.reported["TemperatureThreshold"] == {"value": 25}, "module reported patch visible to the service")
registry.update_module_twin("py-edge-1", "filterModule", Twin(properties=TwinProperties(desired={"TemperatureThreshold": 30})), mtwin.etag)
check(desired.get("module desired patch").get("TemperatureThreshold") == 30, "module desired patch received")

result = registry.invoke_device_module_method("py-edge-1", "filterModule", CloudToDeviceMethod(method_name="reset", payload=None, response_timeout_in_seconds=15))
check(result.status == 200 and result.payload == {"reset": True}, "module method answered")
client.shutdown()
registry.delete_module("py-edge-1", "filterModule")
registry.delete_device("py-edge-1")
