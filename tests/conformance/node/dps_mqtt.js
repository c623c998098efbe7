// Microsoft's Node provisioning client over MQTT with a group-derived symmetric key, then the Node
// device client connecting to the assigned hub.
'use strict';
const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const { Mqtt: ProvisioningMqtt } = require('azure-iot-provisioning-device-mqtt');
const { SymmetricKeySecurityClient } = require('azure-iot-security-symmetric-key');
const { Client, Message } = require('azure-iot-device');
const { Mqtt } = require('azure-iot-device-mqtt');
const { hub, deriveKey, rest, check, within, fail } = require('./common');

async function main() {
  const reg = 'node-sensor-0001';
  const key = deriveKey(hub.group_key, reg);
  const security = new SymmetricKeySecurityClient(reg, key);
  const prov = ProvisioningDeviceClient.create(hub.dps_host, hub.id_scope, new ProvisioningMqtt(), security);
  prov.setProvisioningPayload({ modelId: 'dtmi:com:example:Thermostat;1' });
  const result = await within(new Promise((resolve, reject) => prov.register((err, res) => (err ? reject(err) : resolve(res)))), 'register');
  check(result.assignedHub === hub.hostname && result.deviceId === reg, 'assigned over MQTT');

  const client = Client.fromConnectionString(`HostName=${result.assignedHub};DeviceId=${result.deviceId};SharedAccessKey=${key}`, Mqtt);
  await within(client.open(), 'open');
  await within(client.sendEvent(new Message('{"temp": 1}')), 'sendEvent');
  const events = await rest('GET', `/emulator/devices/${reg}/messages/events`);
  check(events.body.received === 1, 'the provisioned device sends telemetry');
  const twin = await rest('GET', `/twins/${reg}`);
  check(twin.body.modelId === 'dtmi:com:example:Thermostat;1', 'model id from the registration payload');
  await client.close();

  const intruder = ProvisioningDeviceClient.create(hub.dps_host, hub.id_scope, new ProvisioningMqtt(), new SymmetricKeySecurityClient('node-intruder', deriveKey(hub.group_key, 'other')));
  const refused = await within(new Promise((resolve) => intruder.register((err) => resolve(err))), 'refusal');
  check(refused instanceof Error, `a wrong key is refused (${refused && refused.name})`);
}

main().then(() => process.exit(0), fail);
