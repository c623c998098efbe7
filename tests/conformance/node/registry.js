// Microsoft's Node service registry (azure-iothub Registry) against the emulator: list (which
// always sends GET /devices/ with a trailing slash), bulk addDevices / updateDevices /
// removeDevices (POST /devices with importMode), a bulk failure reported per device, statistics,
// and a MAC-address device id.
'use strict';
const { Registry } = require('azure-iothub');
const { hub, check, within, fail } = require('./common');

async function main() {
  const registry = Registry.fromConnectionString(hub.service_connection_string);

  const empty = await within(registry.list(), 'list');
  check(empty.responseBody.length === 0 && empty.httpResponse.statusCode === 200, 'list answers GET /devices/ (trailing slash)');

  const ids = ['bulk-1', 'bulk-2', 'aa:bb:cc:dd:ee:01'];
  const added = await within(registry.addDevices(ids.map((deviceId) => ({ deviceId, status: 'enabled' }))), 'addDevices');
  check(added.responseBody.isSuccessful === true && added.responseBody.errors.length === 0, 'addDevices creates three devices in one request');

  const listed = await within(registry.list(), 'list');
  check(ids.every((id) => listed.responseBody.some((d) => d.deviceId === id)), 'list shows the bulk-created devices, the MAC-address id included');
  const mac = await within(registry.get('aa:bb:cc:dd:ee:01'), 'get');
  check(mac.responseBody.deviceId === 'aa:bb:cc:dd:ee:01', 'a MAC-address id is read back through its encoded path');

  const again = await registry.addDevices([{ deviceId: 'bulk-1' }, { deviceId: 'bulk-3' }]).then(
    (r) => ({ ok: true, r }),
    (e) => ({ ok: false, e }),
  );
  check(!again.ok, 'addDevices with an existing id fails');
  const created3 = await within(registry.get('bulk-3'), 'get bulk-3');
  check(created3.responseBody.deviceId === 'bulk-3', 'the other entry of a partly failed bulk request still applied');

  const updated = await within(registry.updateDevices([{ deviceId: 'bulk-2', status: 'disabled' }], true), 'updateDevices');
  check(updated.responseBody.isSuccessful === true, 'updateDevices (importMode Update)');
  const two = await within(registry.get('bulk-2'), 'get bulk-2');
  check(two.responseBody.status === 'disabled', 'the update applied');

  const stale = await registry.removeDevices([{ deviceId: 'bulk-1', etag: 'bm90LXRoZS1ldGFn' }], false).then(
    () => true,
    () => false,
  );
  check(!stale, 'removeDevices with a stale etag (DeleteIfMatchETag) is refused');
  const removed = await within(registry.removeDevices(ids.concat(['bulk-3']).map((deviceId) => ({ deviceId })), true), 'removeDevices');
  check(removed.responseBody.isSuccessful === true, 'removeDevices (importMode Delete)');
  const after = await within(registry.list(), 'list');
  check(after.responseBody.length === 0, 'every bulk device is gone');

  const stats = await within(registry.getRegistryStatistics(), 'statistics');
  check(stats.responseBody.totalDeviceCount === 0, 'registry statistics');
}

main().then(() => process.exit(0), fail);
