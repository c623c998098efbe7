// Shared helpers for the Node conformance scripts: hub.json, service tokens, REST calls to the
// emulator (trusting its CA through NODE_EXTRA_CA_CERTS), and bounded waits.
'use strict';
const crypto = require('crypto');
const fs = require('fs');
const https = require('https');

const WAIT_MS = 20000;
const hub = JSON.parse(fs.readFileSync(process.env.HUB_JSON, 'utf8'));
const service = Object.fromEntries(hub.service_connection_string.split(';').map((p) => [p.slice(0, p.indexOf('=')), p.slice(p.indexOf('=') + 1)]));

function sas(resource, keyB64, policy) {
  const se = Math.floor(Date.now() / 1000) + 3600;
  const sr = encodeURIComponent(resource);
  const sig = crypto.createHmac('sha256', Buffer.from(keyB64, 'base64')).update(`${sr}\n${se}`).digest('base64');
  return `SharedAccessSignature sr=${sr}&sig=${encodeURIComponent(sig)}&se=${se}` + (policy ? `&skn=${policy}` : '');
}

function deriveKey(groupKeyB64, registrationId) {
  return crypto.createHmac('sha256', Buffer.from(groupKeyB64, 'base64')).update(registrationId).digest('base64');
}

function rest(method, path, body) {
  const [host, port] = service.HostName.split(':');
  const data = body === undefined ? undefined : JSON.stringify(body);
  const sep = path.includes('?') ? '&' : '?';
  return new Promise((resolve, reject) => {
    const req = https.request(
      { host, port: port || 443, method, path: `${path}${sep}api-version=2021-04-12`, headers: { authorization: sas(hub.hostname, service.SharedAccessKey, 'iothubowner'), 'content-type': 'application/json' } },
      (res) => {
        let text = '';
        res.on('data', (c) => (text += c));
        res.on('end', () => resolve({ status: res.statusCode, body: text ? JSON.parse(text) : null }));
      },
    );
    req.on('error', reject);
    if (data) req.write(data);
    req.end();
  });
}

function check(cond, what) {
  if (!cond) {
    console.log(`FAIL: ${what}`);
    process.exit(1);
  }
  console.log(`ok: ${what}`);
}

function within(promise, what) {
  let timer;
  const timeout = new Promise((_, reject) => (timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), WAIT_MS)));
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function fail(err) {
  console.log(`FAIL: ${err && err.stack ? err.stack : err}`);
  process.exit(1);
}

module.exports = { hub, sas, deriveKey, rest, check, within, fail };
