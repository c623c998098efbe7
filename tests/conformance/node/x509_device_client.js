// Microsoft's Node device client (azure-iot-device + azure-iot-device-mqtt) with X.509 certificates
// against the emulator: a connection string with `x509=true` and the certificate and key given by
// setOptions, for a self-signed device registered by thumbprint and a CA-signed device whose root
// is uploaded verified; each connects, sends telemetry, gets its twin and answers a method. A
// certificate signed by another CA and an expired one are refused. Certificates: X509_DIR.
'use strict';
const fs = require('fs');
const path = require('path');
const { Client, Message } = require('azure-iot-device');
const { Mqtt } = require('azure-iot-device-mqtt');
const { hub, rest, check, within, fail } = require('./common');

const dir = process.env.X509_DIR;
const read = (name) => fs.readFileSync(path.join(dir, name), 'utf8');

function client(deviceId, name) {
  const c = Client.fromConnectionString(`HostName=${hub.hostname};DeviceId=${deviceId};x509=true`, Mqtt);
  c.setOptions({ cert: read(`${name}.pem`), key: read(`${name}.key.pem`) });
  return c;
}

async function exercise(deviceId, name) {
  const c = client(deviceId, name);
  c.onDeviceMethod('ping', (req, res) => res.send(200, { echo: req.payload }, () => {}));
  await within(c.open(), `${deviceId} open`);
  check(true, `${deviceId}: connected with its X.509 certificate`);
  await within(c.sendEvent(new Message(`hello from ${deviceId}`)), 'sendEvent');
  const events = await rest('GET', `/emulator/devices/${deviceId}/messages/events`);
  check(events.body.received === 1 && events.body.messages[0].body === `hello from ${deviceId}`, `${deviceId}: telemetry arrived`);
  const twin = await within(c.getTwin(), 'getTwin');
  check(twin.properties.desired.$version === 1, `${deviceId}: twin get`);
  const call = await rest('POST', `/twins/${deviceId}/methods`, { methodName: 'ping', payload: 5, responseTimeoutInSeconds: 15 });
  check(call.status === 200 && call.body.status === 200 && call.body.payload.echo === 5, `${deviceId}: method answered`);
  await c.close();
}

async function refusals(reason) {
  const text = await new Promise((resolve, reject) => {
    require('http').get(hub.metrics_url, (res) => {
      let t = '';
      res.on('data', (d) => (t += d));
      res.on('end', () => resolve(t));
    }).on('error', reject);
  });
  const prefix = `fleetsim_hub_connections_refused_total{reason="${reason}"} `;
  const line = text.split('\n').find((l) => l.startsWith(prefix));
  return line ? Number(line.slice(prefix.length)) : 0;
}

async function main() {
  const sha1 = read('ss.sha1').trim();
  const created = await rest('PUT', '/devices/x509-ss', {
    deviceId: 'x509-ss',
    authentication: { type: 'selfSigned', x509Thumbprint: { primaryThumbprint: sha1, secondaryThumbprint: null } },
  });
  check(created.status === 200 && created.body.authentication.type === 'selfSigned', 'self-signed device created');
  await exercise('x509-ss', 'ss');

  const up = await rest('PUT', '/certificates/node-root', { properties: { certificate: read('root.pem'), isVerified: true } });
  check(up.status === 201 && up.body.properties.isVerified === true, 'root CA uploaded, verified');
  const ca = await rest('PUT', '/devices/x509-ca', { deviceId: 'x509-ca', authentication: { type: 'certificateAuthority' } });
  check(ca.status === 200, 'CA device created');
  await exercise('x509-ca', 'ca-dev');

  for (const [name, reason] of [['wrong', 'cert_untrusted'], ['expired', 'cert_expired']]) {
    const c = client('x509-ca', name);
    let opened = false;
    try {
      await within(c.open(), `${name} open`);
      opened = true;
    } catch (e) {
      console.log(`${name}: open failed: ${e.constructor.name}`);
    }
    check(!opened, `${name} certificate refused`);
    check((await refusals(reason)) >= 1, `the refusal counted as ${reason}`);
    await c.close().catch(() => {});
  }
}

main().then(() => process.exit(0), fail);
