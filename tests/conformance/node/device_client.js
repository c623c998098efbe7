// Microsoft's Node device client (azure-iot-device + azure-iot-device-mqtt) against the emulator:
// connect, telemetry with properties, twin get, reported patch, desired patch, a method answered,
// and a Plug and Play component command (`thermostat1*getMaxMinReport`, as IoT Central sends it).
'use strict';
const { Client, Message } = require('azure-iot-device');
const { Mqtt } = require('azure-iot-device-mqtt');
const { hub, rest, check, within, fail } = require('./common');

async function main() {
  const created = await rest('PUT', '/devices/node-dev-1', { deviceId: 'node-dev-1' });
  check(created.status === 200, 'device created through the service API');
  const key = created.body.authentication.symmetricKey.primaryKey;
  const client = Client.fromConnectionString(`HostName=${hub.hostname};DeviceId=node-dev-1;SharedAccessKey=${key}`, Mqtt);
  client.onDeviceMethod('blink', (req, res) => res.send(200, { description: `Blinking LED every ${req.payload} seconds` }, () => {}));
  client.onDeviceMethod('thermostat1*getMaxMinReport', (req, res) => res.send(200, { component: req.methodName.split('*')[0], since: req.payload }, () => {}));
  await within(client.open(), 'open');
  check(true, 'device connected');

  const msg = new Message(JSON.stringify({ temp: 30 }));
  msg.messageId = 'n-1';
  msg.contentType = 'application/json';
  msg.contentEncoding = 'utf-8';
  msg.properties.add('alert', 'yes');
  await within(client.sendEvent(msg), 'sendEvent');
  const events = await rest('GET', '/emulator/devices/node-dev-1/messages/events');
  const first = events.body.messages[0];
  check(first.body === '{"temp":30}' && first.systemProperties['message-id'] === 'n-1' && first.properties.alert === 'yes', 'telemetry with properties');

  const twin = await within(client.getTwin(), 'getTwin');
  check(twin.properties.desired.$version === 1, 'twin get');
  await within(new Promise((resolve, reject) => twin.properties.reported.update({ state: true }, (err) => (err ? reject(err) : resolve()))), 'reported update');
  const svc = await rest('GET', '/twins/node-dev-1');
  check(svc.body.properties.reported.state === true, 'reported patch visible to the service');

  const desired = new Promise((resolve) => twin.on('properties.desired', (delta) => delta.brightness !== undefined && resolve(delta)));
  const patched = await rest('PATCH', '/twins/node-dev-1', { properties: { desired: { brightness: 9 } } });
  check(patched.status === 200, 'service desired patch');
  const delta = await within(desired, 'desired patch');
  check(delta.brightness === 9 && delta.$version === 2, 'desired patch received with $version');

  const call = await rest('POST', '/twins/node-dev-1/methods', { methodName: 'blink', payload: 4, responseTimeoutInSeconds: 15 });
  check(call.status === 200 && call.body.status === 200 && call.body.payload.description === 'Blinking LED every 4 seconds', 'method answered');
  const cmd = await rest('POST', '/twins/node-dev-1/methods', { methodName: 'thermostat1*getMaxMinReport', payload: '2024-01-01T00:00:00Z', responseTimeoutInSeconds: 15 });
  check(cmd.status === 200 && cmd.body.status === 200 && cmd.body.payload.component === 'thermostat1' && cmd.body.payload.since === '2024-01-01T00:00:00Z', 'component command dispatched by its unencoded name');
  await client.close();
}

main().then(() => process.exit(0), fail);
