"""Microsoft's Python EventHubConsumerClient (azure-eventhub) reads the emulator's Event
Hubs-compatible endpoint: from the connection string in hub.json, over AMQP/TLS on 5671 trusting
the emulator's CA, it lists the partitions, reads the hub and partition properties, and receives
the telemetry Microsoft's Python device client sent over MQTT, with its properties and the
annotations IoT Hub adds, and the non-telemetry events the hub routes with it: the device's
creation, its connection and its reported patch as a twinChangeEvents event. A wrong key is
refused."""

import json
import threading

from azure.eventhub import EventHubConsumerClient
from azure.eventhub.exceptions import AuthenticationError, EventHubError
from azure.iot.device import IoTHubDeviceClient, Message
from azure.iot.hub import IoTHubRegistryManager

from harness import CA_PEM, HUB, WAIT, Box, check, device_cs

CS = HUB["eventhub_connection_string"]
NAME = HUB["eventhub_name"]
check(CS.startswith(f"Endpoint=sb://{HUB['hostname']}/;SharedAccessKeyName=service;") and CS.endswith(f";EntityPath={NAME}"),
      "hub.json gives an Event Hub-compatible connection string")

consumer = EventHubConsumerClient.from_connection_string(CS, consumer_group="$Default", connection_verify=HUB["ca_file"])
ids = consumer.get_partition_ids()
check(ids == ["0", "1", "2", "3"], f"get_partition_ids lists the default four partitions ({ids})")
props = consumer.get_eventhub_properties()
check(props["eventhub_name"] == NAME, "get_eventhub_properties names the endpoint after the hub")

registry = IoTHubRegistryManager.from_connection_string(HUB["service_connection_string"])
dev = registry.create_device_with_sas("eh-dev-1", "", "", "enabled")
key = dev.authentication.symmetric_key.primary_key
device = IoTHubDeviceClient.create_from_connection_string(device_cs("eh-dev-1", key), server_verification_cert=CA_PEM)
device.connect()
for i in range(3):
    msg = Message(json.dumps({"n": i}))
    msg.message_id = f"eh-m-{i}"
    msg.content_type = "application/json"
    msg.content_encoding = "utf-8"
    msg.custom_properties["alert"] = f"level-{i}"
    device.send_message(msg)
device.patch_twin_reported_properties({"firmware": "1.2.3"})

received = []
done = Box()
lock = threading.Lock()


def on_event(partition_context, event):
    if event is None:
        return
    with lock:
        received.append((partition_context.partition_id, event))
        if any(source(e) == "twinChangeEvents" for _, e in received):
            done.put(True)


def source(event):
    return event.system_properties.get(b"iothub-message-source", b"").decode()


worker = threading.Thread(
    target=consumer.receive,
    kwargs={"on_event": on_event, "starting_position": "-1", "max_wait_time": 1},
    daemon=True,
)
worker.start()
done.get("the telemetry and the twin change through the Event Hubs-compatible endpoint")
consumer.close()
worker.join(WAIT)

partitions = {p for p, _ in received}
check(len(partitions) == 1, "one device's events all come from one partition")
everything = [e for _, e in received]
sources = [source(e) for e in everything]
check(sources == ["deviceLifecycleEvents", "deviceConnectionStateEvents", "Telemetry", "Telemetry", "Telemetry",
                  "twinChangeEvents"], f"creation, connection, telemetry and the twin change, in order ({sources})")
check([e.sequence_number for e in everything] == list(range(6)), "x-opt-sequence-number counts from 0 per partition")
twin = everything[-1]
check(twin.body_as_json()["properties"]["reported"]["firmware"] == "1.2.3", "the twin change event carries the patch")
check(twin.body_as_json()["properties"]["reported"]["$version"] == 2, "with the reported section's version")
check(twin.properties.get(b"opType") == b"updateTwin", "opType updateTwin")
check(twin.properties.get(b"iothub-message-schema") == b"twinChangeNotification", "iothub-message-schema")
check(twin.properties.get(b"hubName") == NAME.encode() and twin.properties.get(b"deviceId") == b"eh-dev-1",
      "hubName and deviceId application properties")
check(twin.system_properties.get(b"content-type") == b"application/json", "a JSON body")
check(twin.system_properties.get(b"iothub-connection-device-id") == b"eh-dev-1", "the device's id as the connection")
created = everything[0]
check(created.properties.get(b"opType") == b"createDeviceIdentity" and created.body_as_json()["deviceId"] == "eh-dev-1",
      "the device's creation as a lifecycle event")
check(everything[1].properties.get(b"opType") == b"deviceConnected", "its connection as a connection state event")
events = [e for e in everything if source(e) == "Telemetry"]
check([json.loads(e.body_as_str()) for e in events] == [{"n": 0}, {"n": 1}, {"n": 2}], "bodies arrive as sent, in order")
first = events[0]
sysp = first.system_properties
check(first.properties.get(b"alert") == b"level-0", "application properties from the device")
check(sysp.get(b"iothub-connection-device-id") == b"eh-dev-1", "iothub-connection-device-id annotation")
check(b"iothub-connection-module-id" not in sysp, "no module id for a device")
check(sysp.get(b"message-id") == b"eh-m-0", "message id as the AMQP message-id")
check(sysp.get(b"content-type") == b"application/json", "content type as the AMQP content-type")
check(isinstance(sysp.get(b"iothub-enqueuedtime"), int) and sysp[b"iothub-enqueuedtime"] > 0, "iothub-enqueuedtime annotation")
check(sysp.get(b"iothub-message-source") == b"Telemetry", "iothub-message-source annotation")
check(sysp.get(b"iothub-connection-auth-method") is not None, "iothub-connection-auth-method annotation")
check(len({e.offset for e in events}) == 3, "x-opt-offset differs per event")
check(first.enqueued_time is not None, "x-opt-enqueued-time annotation")

pid = received[0][0]
consumer = EventHubConsumerClient.from_connection_string(CS, consumer_group="$Default", connection_verify=HUB["ca_file"])
p = consumer.get_partition_properties(pid)
check(p["last_enqueued_sequence_number"] == 5 and p["beginning_sequence_number"] == 0 and not p["is_empty"],
      "get_partition_properties reports the partition's sequence numbers")

# Starting after the first event's sequence number gives the rest, in a consumer group of any name.
after = []
more = Box()


def on_later(partition_context, event):
    if event is not None:
        after.append(event)
        if len(after) >= 2:
            more.put(True)


worker = threading.Thread(
    target=consumer.receive,
    kwargs={"on_event": on_later, "partition_id": pid, "starting_position": events[0].sequence_number,
            "starting_position_inclusive": False,
            "max_wait_time": 1},
    daemon=True,
)
worker.start()
more.get("events after the first telemetry's sequence number")
consumer.close()
worker.join(WAIT)
check([e.sequence_number for e in after[:2]] == [3, 4], "a sequence-number start position skips what came before")
device.shutdown()

bad = CS.replace(CS.split("SharedAccessKey=")[1].split(";")[0], "d3Jvbmcga2V5IHdyb25nIGtleSB3cm9uZyBrZXk=")
intruder = EventHubConsumerClient.from_connection_string(bad, consumer_group="$Default", connection_verify=HUB["ca_file"],
                                                         retry_total=0)
try:
    intruder.get_partition_ids()
    refused = None
except AuthenticationError as e:
    refused = e
except EventHubError as e:
    refused = e
finally:
    intruder.close()
check(isinstance(refused, AuthenticationError), f"a wrong key is refused as an authentication error ({refused!r})")
