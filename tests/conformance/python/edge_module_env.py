"""Module code built for IoT Edge, run unchanged against the emulator: `fleetsim edge env` gives
the IOTEDGE_* environment, and Microsoft's IoTHubModuleClient.create_from_edge_environment()
gets the trust bundle and its token signatures from the emulator's workload socket, connects,
reads the twin the deployment set and sends to an output that the deployment routes upstream."""

import json
import os
import subprocess

from azure.iot.device import IoTHubModuleClient, Message
from azure.iot.hub import IoTHubConfigurationManager, IoTHubRegistryManager
from azure.iot.hub.models import ConfigurationContent

from harness import HUB, check, emulator_get

registry = IoTHubRegistryManager.from_connection_string(HUB["service_connection_string"])
registry.create_device_with_sas("py-envedge", "", "", "enabled", iot_edge=True)
configs = IoTHubConfigurationManager.from_connection_string(HUB["service_connection_string"])
configs.apply_configuration_on_edge_device("py-envedge", ConfigurationContent(modules_content={
    "$edgeAgent": {"properties.desired": {"schemaVersion": "1.1", "modules": {"envModule": {}}}},
    "$edgeHub": {"properties.desired": {"schemaVersion": "1.1",
                                        "routes": {"up": "FROM /messages/modules/envModule/outputs/* INTO $upstream"}}},
    "envModule": {"properties.desired": {"SendInterval": 5}},
}))

def edge_env(*extra):
    return subprocess.run([os.environ["FLEETSIM"], "edge", "env", *extra, "--hub-json", os.environ["HUB_JSON"]],
                          capture_output=True, text=True)

out = edge_env("py-envedge", "envModule", "--json")
check(out.returncode == 0, f"fleetsim edge env ran ({out.stderr.strip()})")
env = json.loads(out.stdout)
check(env["IOTEDGE_WORKLOADURI"].startswith("unix://") and env["IOTEDGE_MODULEID"] == "envModule",
      "the environment names the workload socket and the module")
check(edge_env("py-envedge", "nosuch").returncode != 0, "an unknown module is an error")
os.environ.update(env)

client = IoTHubModuleClient.create_from_edge_environment()
client.connect()
check(client.connected, "create_from_edge_environment connected through the workload API")
check(client.get_twin()["desired"]["SendInterval"] == 5, "the module reads the twin its deployment set")
client.send_message_to_output(Message("reading"), "out1")
events = emulator_get("/emulator/devices/py-envedge/modules/envModule/messages/events")
check(events["received"] == 1 and events["messages"][0]["body"] == "reading", "its output went upstream by the route")
client.shutdown()
registry.delete_device("py-envedge")
