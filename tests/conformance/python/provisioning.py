"""Microsoft's Python ProvisioningDeviceClient: a group-enrollment member with a derived key
registers over MQTT (with an IoT Central model id payload), then connects to the assigned hub."""

from azure.iot.device import IoTHubDeviceClient, Message, ProvisioningDeviceClient

from harness import CA_PEM, HUB, check, derive_key, emulator_get

REG = "py-sensor-0001"
key = derive_key(HUB["group_key"], REG)
prov = ProvisioningDeviceClient.create_from_symmetric_key(
    provisioning_host=HUB["dps_host"], registration_id=REG, id_scope=HUB["id_scope"], symmetric_key=key, server_verification_cert=CA_PEM
)
prov.provisioning_payload = {"modelId": "dtmi:com:example:EnvironmentalSensor;1"}
result = prov.register()
check(result.status == "assigned", "registration assigned")
state = result.registration_state
check(state.assigned_hub == HUB["hostname"] and state.device_id == REG, "assigned to this hub as the registration id")
recorded = emulator_get(f"/emulator/registrations/{REG}")
check(recorded["requestPayload"] == {"modelId": "dtmi:com:example:EnvironmentalSensor;1"}, "registration payload recorded")

client = IoTHubDeviceClient.create_from_symmetric_key(symmetric_key=key, hostname=state.assigned_hub, device_id=state.device_id, server_verification_cert=CA_PEM)
client.connect()
client.send_message(Message('{"temp": 20}'))
check(emulator_get(f"/emulator/devices/{REG}/messages/events")["received"] == 1, "the provisioned device sends telemetry")
client.shutdown()

# A key that does not derive from any group is refused.
bad = ProvisioningDeviceClient.create_from_symmetric_key(
    provisioning_host=HUB["dps_host"], registration_id="py-intruder", id_scope=HUB["id_scope"], symmetric_key=derive_key(HUB["group_key"], "someone-else"), server_verification_cert=CA_PEM
)
try:
    bad.register()
    check(False, "a wrong key is refused")
except Exception as e:  # the SDK raises CredentialError wrapped in a ClientError
    check("redential" in repr(e) or "nauthori" in repr(e), f"a wrong key is refused ({type(e).__name__})")
