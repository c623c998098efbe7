"""Microsoft's IoTHubRegistryManager.send_c2d_message (azure-iot-hub, over AMQP/TLS on 5671 with a
token on $cbs) sends cloud-to-device messages that Microsoft's Python device client receives over
MQTT, with the message id, content type and application properties; a message to an unknown
device is refused, and the sender keeps working afterwards."""

from azure.iot.device import IoTHubDeviceClient
from azure.iot.hub import IoTHubRegistryManager

from harness import CA_PEM, HUB, Box, check, device_cs

registry = IoTHubRegistryManager.from_connection_string(HUB["service_connection_string"])
dev = registry.create_device_with_sas("c2d-dev-1", "", "", "enabled")
key = dev.authentication.symmetric_key.primary_key
device = IoTHubDeviceClient.create_from_connection_string(device_cs("c2d-dev-1", key), server_verification_cert=CA_PEM)
received = Box()
device.on_message_received = received.put
device.connect()

registry.send_c2d_message("c2d-dev-1", "hello over amqp", properties={"messageId": "c2d-1", "contentType": "text/plain", "color": "blue"})
m = received.get("the C2D message at the device")
check(m.data == b"hello over amqp", "the body arrives as sent")
check(m.message_id == "c2d-1", "the message id arrives")
check(m.content_type == "text/plain", "the content type arrives")
check(m.custom_properties.get("color") == "blue", "application properties arrive")

try:
    registry.send_c2d_message("no-such-device", "x")
    refused = False
except Exception:  # azure-iot-hub raises a bare Exception("C2D message send failure")
    refused = True
check(refused, "a message to an unknown device is refused")

again = Box()
device.on_message_received = again.put
registry.send_c2d_message("c2d-dev-1", "second")
check(again.get("a second C2D message").data == b"second", "the sender works after a refusal")
device.shutdown()
