"""Microsoft's Python EventHubConsumerClient (azure-eventhub) reads the emulator's Event
Hubs-compatible endpoint over AMQP over WebSockets (TransportType.AmqpOverWebsocket: wss on the
HTTPS port, 443, path /$servicebus/websocket, subprotocol AMQPWSB10) with the connection string
from hub.json, trusting the emulator's CA: partition ids, and the telemetry and twin change
Microsoft's Python device client caused, with their annotations."""

import json
import threading

from azure.eventhub import EventHubConsumerClient, TransportType
from azure.iot.device import IoTHubDeviceClient, Message
from azure.iot.hub import IoTHubRegistryManager

from harness import CA_PEM, HUB, WAIT, Box, check, device_cs

CS = HUB["eventhub_connection_string"]

consumer = EventHubConsumerClient.from_connection_string(
    CS, consumer_group="$Default", connection_verify=HUB["ca_file"], transport_type=TransportType.AmqpOverWebsocket)
ids = consumer.get_partition_ids()
check(ids == ["0", "1", "2", "3"], f"get_partition_ids over WebSockets ({ids})")

registry = IoTHubRegistryManager.from_connection_string(HUB["service_connection_string"])
dev = registry.create_device_with_sas("ws-dev-1", "", "", "enabled")
device = IoTHubDeviceClient.create_from_connection_string(
    device_cs("ws-dev-1", dev.authentication.symmetric_key.primary_key), server_verification_cert=CA_PEM)
device.connect()
msg = Message(json.dumps({"over": "websockets"}))
msg.message_id = "ws-m-1"
device.send_message(msg)
device.patch_twin_reported_properties({"transport": "wss"})

received = []
done = Box()
lock = threading.Lock()


def on_event(partition_context, event):
    if event is None:
        return
    if event.system_properties.get(b"iothub-connection-device-id") != b"ws-dev-1":
        return
    with lock:
        received.append(event)
        if any(e.system_properties.get(b"iothub-message-source") == b"twinChangeEvents" for e in received):
            done.put(True)


worker = threading.Thread(
    target=consumer.receive, kwargs={"on_event": on_event, "starting_position": "-1", "max_wait_time": 1}, daemon=True)
worker.start()
done.get("the device's events over AMQP over WebSockets")
consumer.close()
worker.join(WAIT)
device.shutdown()

telemetry = [e for e in received if e.system_properties.get(b"iothub-message-source") == b"Telemetry"]
check(len(telemetry) == 1 and telemetry[0].body_as_json() == {"over": "websockets"}, "the telemetry arrives as sent")
check(telemetry[0].system_properties.get(b"message-id") == b"ws-m-1", "with its message id")
twin = [e for e in received if e.system_properties.get(b"iothub-message-source") == b"twinChangeEvents"][0]
check(twin.body_as_json()["properties"]["reported"]["transport"] == "wss", "the twin change event carries the patch")
