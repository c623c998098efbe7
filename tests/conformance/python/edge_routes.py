"""Microsoft's Python SDKs against the emulator as IoT Edge hub: an Edge device created by
IoTHubRegistryManager, a deployment applied by IoTHubConfigurationManager, and two
IoTHubModuleClients: tempSensor sends to an output, the deployment's route delivers to
filterModule's input (message.input_name), filterModule forwards hot readings upstream."""

import json

from azure.iot.device import IoTHubModuleClient, Message
from azure.iot.hub import IoTHubConfigurationManager, IoTHubRegistryManager
from azure.iot.hub.models import ConfigurationContent

from harness import CA_PEM, HUB, Box, check, device_cs, emulator_get

registry = IoTHubRegistryManager.from_connection_string(HUB["service_connection_string"])
registry.create_device_with_sas("py-edge", "", "", "enabled", iot_edge=True)
modules = sorted(m.module_id for m in registry.get_modules("py-edge"))
check(modules == ["$edgeAgent", "$edgeHub"], "an Edge device comes with $edgeAgent and $edgeHub")

routes = {
    "sensorToFilter": "FROM /messages/modules/tempSensor/outputs/temperatureOutput "
    "WHERE $body.machine.temperature > 25 INTO BrokeredEndpoint(\"/modules/filterModule/inputs/input1\")",
    "filterToIoTHub": "FROM /messages/modules/filterModule/outputs/output1 INTO $upstream",
}
content = ConfigurationContent(modules_content={
    "$edgeAgent": {"properties.desired": {"schemaVersion": "1.1", "modules": {"tempSensor": {}, "filterModule": {}}}},
    "$edgeHub": {"properties.desired": {"schemaVersion": "1.1", "routes": routes,
                                        "storeAndForwardConfiguration": {"timeToLiveSecs": 7200}}},
    "filterModule": {"properties.desired": {"TemperatureThreshold": 25}},
})
configs = IoTHubConfigurationManager.from_connection_string(HUB["service_connection_string"])
configs.apply_configuration_on_edge_device("py-edge", content)
modules = sorted(m.module_id for m in registry.get_modules("py-edge"))
check(modules == ["$edgeAgent", "$edgeHub", "filterModule", "tempSensor"], "the deployment created the modules")
check(registry.get_module_twin("py-edge", "filterModule").properties.desired["TemperatureThreshold"] == 25,
      "the deployment set the module twin")

bad = ConfigurationContent(modules_content={"$edgeHub": {"properties.desired": {"routes": {"r": "FROM /messages/* INTO nowhere"}}}})
try:
    configs.apply_configuration_on_edge_device("py-edge", bad)
    check(False, "a bad route is refused")
except Exception as e:  # msrest's HttpOperationError, carrying the response
    resp = getattr(e, "response", None)
    check(resp is not None and resp.status_code == 400 and "route r" in resp.text,
          "a bad route is refused with 400, naming the route")


def client(module):
    key = registry.get_module("py-edge", module).authentication.symmetric_key.primary_key
    c = IoTHubModuleClient.create_from_connection_string(device_cs("py-edge", key, module), server_verification_cert=CA_PEM)
    c.connect()
    return c


received = Box()
filter_client = client("filterModule")
filter_client.on_message_received = received.put
sensor = client("tempSensor")


def reading(t):
    m = Message(json.dumps({"machine": {"temperature": t}}), content_encoding="utf-8", content_type="application/json")
    m.custom_properties["reading"] = str(t)
    return m


sensor.send_message_to_output(reading(20.5), "temperatureOutput")
sensor.send_message_to_output(reading(31.5), "temperatureOutput")
got = received.get("the routed reading")
check(got.input_name == "input1", "routed to filterModule's input1 (message.input_name)")
check(got.custom_properties.get("reading") == "31.5", "only the reading the condition takes arrives, with its properties")
body = json.loads(got.data)
alert = Message(json.dumps(body), content_encoding="utf-8", content_type="application/json")
alert.custom_properties["MessageType"] = "Alert"
filter_client.send_message_to_output(alert, "output1")
events = emulator_get("/emulator/devices/py-edge/modules/filterModule/messages/events")
check(events["received"] == 1 and events["messages"][0]["properties"]["MessageType"] == "Alert",
      "the filtered message reached $upstream")
sensor_events = emulator_get("/emulator/devices/py-edge/modules/tempSensor/messages/events")
check(sensor_events["received"] == 0, "the sensor's readings went only where the routes say")
filter_client.shutdown()
sensor.shutdown()
registry.delete_device("py-edge")
