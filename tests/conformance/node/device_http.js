// Microsoft's Node device client over HTTPS (azure-iot-device + azure-iot-device-http) against the
// emulator: sendEvent with system and application properties and a sequence stamp, sendEventBatch,
// and C2D polled by the client's receiver, then completed, rejected and abandoned (an abandoned
// message comes back); a wrong key is refused with the SDK's UnauthorizedError.
'use strict';
const http = require('http');
const { Client, Message } = require('azure-iot-device');
const { Http } = require('azure-iot-device-http');
const { hub, rest, check, within, fail } = require('./common');

function metric(series) {
  return new Promise((resolve, reject) => {
    http
      .get('http://127.0.0.1:9464/metrics', (res) => {
        let text = '';
        res.on('data', (c) => (text += c));
        res.on('end', () => {
          const line = text.split('\n').find((l) => l.startsWith(series + ' '));
          resolve(line ? Number(line.split(' ').pop()) : 0);
        });
      })
      .on('error', reject);
  });
}

async function main() {
  const created = await rest('PUT', '/devices/node-http-1', { deviceId: 'node-http-1' });
  check(created.status === 200, 'device created through the service API');
  const key = created.body.authentication.symmetricKey.primaryKey;
  const client = Client.fromConnectionString(`HostName=${hub.hostname};DeviceId=node-http-1;SharedAccessKey=${key}`, Http);
  await within(client.open(), 'open');

  const msg = new Message(JSON.stringify({ temp: 21 }));
  msg.messageId = 'h-1';
  msg.correlationId = 'corr-1';
  msg.contentType = 'application/json';
  msg.contentEncoding = 'utf-8';
  msg.properties.add('alert', 'yes');
  msg.properties.add('fleetsim-seq', 'noderun:1');
  await within(client.sendEvent(msg), 'sendEvent');
  let events = await rest('GET', '/emulator/devices/node-http-1/messages/events');
  const first = events.body.messages[0];
  check(
    first.body === '{"temp":21}' &&
      first.systemProperties['message-id'] === 'h-1' &&
      first.systemProperties['correlation-id'] === 'corr-1' &&
      first.systemProperties['content-type'] === 'application/json' &&
      first.properties.alert === 'yes',
    'sendEvent over HTTPS stored with system and application properties',
  );

  const batch = [1, 2, 3].map((n) => {
    const m = new Message(JSON.stringify({ n }));
    m.properties.add('fleetsim-seq', `noderun:${n + 1}`);
    return m;
  });
  await within(client.sendEventBatch(batch), 'sendEventBatch');
  events = await rest('GET', '/emulator/devices/node-http-1/messages/events');
  check(events.body.received === 4 && events.body.messages[3].body === '{"n":3}', 'sendEventBatch stored every message, base64 bodies decoded');
  const seq = await rest('GET', '/emulator/telemetry/sequence?run=noderun');
  check(seq.body.unique === 4 && seq.body.gaps === 0 && seq.body.duplicates === 0, 'sequence stamps counted from the HTTPS path');

  for (const [i, body] of ['complete me', 'reject me', 'abandon me'].entries()) {
    const sent = await rest('POST', '/emulator/devices/node-http-1/messages/deviceBound', { body, messageId: `c2d-${i}`, properties: { color: 'red' } });
    check(sent.status === 200, `C2D ${i} queued`);
  }
  const seen = [];
  // Each settle is its own HTTP request, so the fourth can be answered before an earlier one:
  // the counters are read only once all four have been answered.
  const actions = [];
  const settled = new Promise((resolve, reject) => {
    client.on('error', reject);
    client.on('message', (m) => {
      const text = m.getData().toString();
      seen.push(m.messageId);
      let action;
      if (text === 'complete me') action = client.complete(m);
      else if (text === 'reject me') action = client.reject(m);
      else if (seen.filter((id) => id === m.messageId).length === 1) action = client.abandon(m);
      else action = client.complete(m);
      actions.push(action);
      action.catch(reject);
      if (seen.length === 4) Promise.all(actions).then(() => resolve(m), reject);
    });
  });
  const last = await within(settled, 'four C2D deliveries settled');
  check(seen.join(',') === 'c2d-0,c2d-1,c2d-2,c2d-2', `complete, reject, abandon, then the abandoned one again (${seen})`);
  check(last.properties.getValue('iothub-app-color') === 'red', 'C2D application properties arrive as iothub-app-* headers');
  const counted = {};
  for (const event of ['delivered', 'completed', 'rejected', 'abandoned']) {
    counted[event] = await metric(`fleetsim_hub_c2d_messages_total{event="${event}"}`);
  }
  check(
    counted.completed === 2 && counted.rejected === 1 && counted.abandoned === 1,
    `the hub counted two completions, one rejection, one abandon (${JSON.stringify(counted)})`,
  );
  await client.close();

  const wrong = Client.fromConnectionString(`HostName=${hub.hostname};DeviceId=node-http-1;SharedAccessKey=${Buffer.alloc(32).toString('base64')}`, Http);
  const refused = await within(wrong.sendEvent(new Message('x')).then(() => null, (e) => e), 'refusal');
  check(refused && refused.constructor.name === 'UnauthorizedError', `a wrong key is refused as UnauthorizedError (${refused && refused.constructor.name})`);
}

main().then(() => process.exit(0), fail);
