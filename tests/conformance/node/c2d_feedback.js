// Microsoft's Node service client (azure-iothub Client, AMQP) sends C2D messages with `ack` set and
// reads their feedback with getFeedbackReceiver: a message the Node device client (MQTT) completes
// gives a Success record, one that expires before its offline device connects an Expired record,
// each in a feedback message of content type application/vnd.microsoft.iothub.feedback.json
// whose body is the JSON array of records IoT Hub documents; and the same over AMQP over WebSockets
// (AmqpWs: wss://host:443/$iothub/websocket, subprotocol AMQPWSB10).
'use strict';
const { Client: ServiceClient, AmqpWs } = require('azure-iothub');
const { Client: DeviceClient, Message } = require('azure-iot-device');
const { Mqtt } = require('azure-iot-device-mqtt');
const { hub, rest, check, within, fail } = require('./common');

const cb = (resolve, reject) => (err, res) => (err ? reject(err) : resolve(res));

async function main() {
  const online = await rest('PUT', '/devices/node-fb-1', { deviceId: 'node-fb-1' });
  const offline = await rest('PUT', '/devices/node-fb-2', { deviceId: 'node-fb-2' });
  check(online.status === 200 && offline.status === 200, 'devices created through the service API');
  const key = online.body.authentication.symmetricKey.primaryKey;
  const device = DeviceClient.fromConnectionString(`HostName=${hub.hostname};DeviceId=node-fb-1;SharedAccessKey=${key}`, Mqtt);
  const delivered = new Promise((resolve) => device.on('message', (msg) => device.complete(msg, () => resolve(msg))));
  await within(device.open(), 'device open');

  const service = ServiceClient.fromConnectionString(hub.service_connection_string);
  await within(new Promise((resolve, reject) => service.open(cb(resolve, reject))), 'service open');
  const receiver = await within(new Promise((resolve, reject) => service.getFeedbackReceiver(cb(resolve, reject))), 'getFeedbackReceiver');
  const records = [];
  const feedbackTypes = new Set();
  const twoRecords = new Promise((resolve) => {
    receiver.on('message', (msg) => {
      feedbackTypes.add(msg.contentType);
      for (const r of JSON.parse(msg.getData().toString())) records.push(r);
      receiver.complete(msg, () => {});
      if (records.length >= 2) resolve();
    });
  });

  const ok = new Message('hello');
  ok.messageId = 'n-fb-ok';
  ok.ack = 'full';
  await within(new Promise((resolve, reject) => service.send('node-fb-1', ok, cb(resolve, reject))), 'send to the online device');
  const got = await within(delivered, 'the C2D message at the device');
  check(got.getData().toString() === 'hello' && got.messageId === 'n-fb-ok', 'the device client receives the message');

  const late = new Message('too late');
  late.messageId = 'n-fb-expired';
  late.ack = 'negative';
  late.expiryTimeUtc = Date.now() + 1000;
  await within(new Promise((resolve, reject) => service.send('node-fb-2', late, cb(resolve, reject))), 'send to the offline device');

  await within(twoRecords, 'two feedback records');
  const byId = Object.fromEntries(records.map((r) => [r.originalMessageId, r]));
  check(byId['n-fb-ok'] && byId['n-fb-ok'].statusCode === 'Success' && byId['n-fb-ok'].deviceId === 'node-fb-1', 'Success for the completed message');
  check(byId['n-fb-expired'] && byId['n-fb-expired'].statusCode === 'Expired' && byId['n-fb-expired'].deviceId === 'node-fb-2', 'Expired for the one that expired');
  check(records.every((r) => typeof r.deviceGenerationId === 'string' && typeof r.enqueuedTimeUtc === 'string' && typeof r.description === 'string'), 'each record has deviceGenerationId, enqueuedTimeUtc and description');
  check(feedbackTypes.size === 1 && feedbackTypes.has('application/vnd.microsoft.iothub.feedback.json'), `feedback content type (${[...feedbackTypes]})`);
  await new Promise((resolve) => service.close(() => resolve()));

  // The same service client over AMQP over WebSockets (wss://host:443/$iothub/websocket).
  const again = new Promise((resolve) => device.on('message', (msg) => msg.messageId === 'n-fb-ws' && resolve(msg)));
  const overWs = ServiceClient.fromConnectionString(hub.service_connection_string, AmqpWs);
  await within(new Promise((resolve, reject) => overWs.open(cb(resolve, reject))), 'service open over WebSockets');
  const wsReceiver = await within(new Promise((resolve, reject) => overWs.getFeedbackReceiver(cb(resolve, reject))), 'getFeedbackReceiver over WebSockets');
  const wsRecord = new Promise((resolve) => wsReceiver.on('message', (msg) => {
    const found = JSON.parse(msg.getData().toString()).find((r) => r.originalMessageId === 'n-fb-ws');
    wsReceiver.complete(msg, () => {});
    if (found) resolve(found);
  }));
  const viaWs = new Message('over websockets');
  viaWs.messageId = 'n-fb-ws';
  viaWs.ack = 'positive';
  await within(new Promise((resolve, reject) => overWs.send('node-fb-1', viaWs, cb(resolve, reject))), 'send over WebSockets');
  const arrived = await within(again, 'the WebSocket-sent message at the device');
  check(arrived.getData().toString() === 'over websockets', 'Client.send over AmqpWs reaches the device');
  const record = await within(wsRecord, 'feedback over WebSockets');
  check(record.statusCode === 'Success', 'its Success feedback arrives over AmqpWs');
  await device.close();
  await new Promise((resolve) => overWs.close(() => resolve()));
}

main().then(() => process.exit(0), fail);
