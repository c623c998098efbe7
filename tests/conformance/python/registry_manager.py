"""Microsoft's Python IoTHubRegistryManager: devices and modules with generated keys, twins and
module twins get/update, device and module methods invoked, deletion, and the hub's errors."""

from azure.iot.device import IoTHubDeviceClient, IoTHubModuleClient, MethodResponse
from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import CloudToDeviceMethod, Twin, TwinProperties

from harness import CA_PEM, HUB, check, device_cs

rm = IoTHubRegistryManager.from_connection_string(HUB["service_connection_string"])
dev = rm.create_device_with_sas("rm-dev", "", "", "enabled")
check(len(dev.authentication.symmetric_key.primary_key) == 44, "generated device keys")
mod = rm.create_module_with_sas("rm-dev", "rm-mod", None, "", "")
check(mod.module_id == "rm-mod" and len(mod.authentication.symmetric_key.secondary_key) == 44, "generated module keys")
check(rm.get_device("rm-dev").device_id == "rm-dev", "get device")
check([m.module_id for m in rm.get_modules("rm-dev")] == ["rm-mod"], "list modules")
check(any(d.device_id == "rm-dev" for d in rm.get_devices()), "list devices")

try:
    rm.create_device_with_sas("rm-dev", "", "", "enabled")
    check(False, "creating an existing device fails")
except Exception as e:
    check("409" in str(e) or "Conflict" in str(e), "creating an existing device is a 409")

twin = rm.get_twin("rm-dev")
updated = rm.update_twin("rm-dev", Twin(tags={"site": "lab"}, properties=TwinProperties(desired={"mode": "eco"})), twin.etag)
check(updated.tags["site"] == "lab" and updated.properties.desired["mode"] == "eco", "update twin")
try:
    rm.update_twin("rm-dev", Twin(tags={"site": "x"}), twin.etag)
    check(False, "a stale etag is refused")
except Exception as e:
    check("412" in str(e) or "Precondition" in str(e), "a stale etag is a 412")
mtwin = rm.get_module_twin("rm-dev", "rm-mod")
mupdated = rm.update_module_twin("rm-dev", "rm-mod", Twin(properties=TwinProperties(desired={"interval": 10})), mtwin.etag)
check(mupdated.properties.desired["interval"] == 10, "update module twin")
replaced = rm.replace_twin("rm-dev", Twin(properties=TwinProperties(desired={"only": 1})))
check(replaced.properties.desired.get("mode") is None and replaced.properties.desired["only"] == 1, "replace twin")

dc = IoTHubDeviceClient.create_from_connection_string(device_cs("rm-dev", dev.authentication.symmetric_key.primary_key), server_verification_cert=CA_PEM)
dc.on_method_request_received = lambda r: dc.send_method_response(MethodResponse.create_from_method_request(r, 200, {"who": "device"}))
dc.connect()
mc = IoTHubModuleClient.create_from_connection_string(device_cs("rm-dev", mod.authentication.symmetric_key.primary_key, "rm-mod"), server_verification_cert=CA_PEM)
mc.on_method_request_received = lambda r: mc.send_method_response(MethodResponse.create_from_method_request(r, 404, {"who": "module"}))
mc.connect()
r = rm.invoke_device_method("rm-dev", CloudToDeviceMethod(method_name="whoami", payload={}, response_timeout_in_seconds=15))
check(r.status == 200 and r.payload == {"who": "device"}, "device method")
r = rm.invoke_device_module_method("rm-dev", "rm-mod", CloudToDeviceMethod(method_name="whoami", response_timeout_in_seconds=15))
check(r.status == 404 and r.payload == {"who": "module"}, "module method, device status passed through")
dc.shutdown()
mc.shutdown()

rm.delete_module("rm-dev", "rm-mod")
rm.delete_device("rm-dev")
try:
    rm.get_device("rm-dev")
    check(False, "a deleted device is gone")
except Exception as e:
    check("404" in str(e) or "Not Found" in str(e), "a deleted device is a 404")
