//! The emulator as IoT Edge hub: deployments applied to Edge devices, keeping each device's route
//! table (`edge_routes.rs`) in step with its `$edgeHub` module twin, and routing its modules'
//! messages to `$upstream` or to another module's input.
//!
//! Like the real Edge hub, the emulator reads routes from the `$edgeHub` module twin's desired
//! properties (`routes`, `storeAndForwardConfiguration.timeToLiveSecs`), so a deployment, a twin
//! PATCH from any service client, and a restart with a durable store all lead to the same table.
//! A message from a module of an Edge device with a table goes where its routes say: upstream into
//! the hub's telemetry (and the Event Hubs-compatible endpoint), to module inputs (the module's
//! queue, delivered at least once over MQTT on `devices/{d}/modules/{m}/inputs/{input}/...`,
//! kept while the module is offline until the time to live), or nowhere when no route takes it,
//! as Edge drops unrouted messages. Modules of devices without a table go upstream, as before.
//!
//! Sources: Microsoft's "Deploy modules and establish routes in IoT Edge", "Properties of the IoT
//! Edge agent and IoT Edge hub module twins", and the REST "Configuration - Apply On Edge Device"
//! (204 No Content).

use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;

use super::edge_routes::route_table;
use super::registry::{Identity, Record};
use super::state::HubState;
use crate::iot::property_bag::PropertyBag;
use crate::iot::route::{ModuleMessage, Plan};
use crate::iot::sas::Key;

/// The module twins every Edge device has (Azure creates them with the device).
pub const SYSTEM_MODULES: [&str; 2] = ["$edgeAgent", "$edgeHub"];

/// How many routed messages one module's input queue holds while it is offline; past it the
/// oldest go first (Edge bounds store-and-forward by disk; the emulator by count).
pub const MAX_QUEUED_INPUTS: usize = 10_000;

/// Rebuilds a device's route table from its `$edgeHub` twin (after a deployment, a twin write, a
/// deletion or a start-up). A table that no longer parses is dropped (and counted) rather than
/// kept stale, so a broken twin routes like a device without routes.
pub fn refresh(hub: &HubState, device_id: &str) {
    let desired = hub.registry.get(device_id, Some("$edgeHub")).map(|m| {
        let st = m.lock();
        let (_, props) = st.twin.service_parts();
        props.get("desired").and_then(Value::as_object).cloned().unwrap_or_default()
    });
    let table = match desired {
        Some(d) if d.contains_key("routes") => match route_table(&d) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(
                    device = device_id,
                    "the $edgeHub twin's routes do not parse ({e}); routing is off for this device"
                );
                hub.metrics.edge_routed.with_label_values(&["bad_routes"]).inc();
                None
            }
        },
        _ => None,
    };
    hub.edge.set(device_id, table);
}

/// Rebuilds every Edge device's table (at start-up, when the registry came from a store).
pub fn refresh_all(hub: &HubState) {
    let devices: Vec<String> = hub
        .registry
        .all()
        .into_iter()
        .filter(|i| i.module_id.as_deref() == Some("$edgeHub"))
        .map(|i| i.device_id.clone())
        .collect();
    for d in devices {
        refresh(hub, &d);
    }
}

/// Creates the `$edgeAgent` and `$edgeHub` module identities of an Edge device that lacks them, as
/// IoT Hub does when a device is created (or updated) with `capabilities.iotEdge = true`.
pub fn ensure_system_modules(hub: &HubState, device_id: &str) {
    for m in SYSTEM_MODULES {
        ensure_module(hub, device_id, m);
    }
}

fn ensure_module(hub: &HubState, device_id: &str, module: &str) -> Option<Arc<Identity>> {
    if let Some(i) = hub.registry.get(device_id, Some(module)) {
        return Some(i);
    }
    let now = super::clock::wall();
    let record = Record::new(Key::generate(), Key::generate());
    // A concurrent creation of the same module is as good as ours.
    match hub.registry.create(device_id, Some(module), record, now) {
        Ok(i) => {
            hub.store.identity(&i);
            Some(i)
        }
        Err(_) => hub.registry.get(device_id, Some(module)),
    }
}

/// Why a deployment could not be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyError {
    DeviceNotFound,
    /// 400 ArgumentInvalid, with the reason.
    Invalid(String),
}

/// Applies `configurationContent` to Edge device `device_id`: every module named in
/// `modulesContent` (and every module `$edgeAgent` lists under `modules`) gets an identity if it
/// lacks one (the emulator stands in for the Edge agent, which creates them on a real device), and
/// each module twin's desired properties become those given, tags kept; connected modules get the
/// desired patch. Everything is checked (shapes, routes) before anything changes.
pub fn apply(hub: &HubState, device_id: &str, content: &Value) -> Result<(), ApplyError> {
    let invalid = |m: String| Err(ApplyError::Invalid(m));
    let device = hub.registry.get(device_id, None).ok_or(ApplyError::DeviceNotFound)?;
    if !device.lock().record.iot_edge {
        return invalid(format!("device {device_id} is not an IoT Edge device (capabilities.iotEdge is false)"));
    }
    let Some(modules) = content.get("modulesContent").and_then(Value::as_object) else {
        return invalid("the configuration content has no modulesContent object".into());
    };
    let mut desired_by_module = Vec::new();
    for (module, content) in modules {
        if !super::registry::valid_id(module) {
            return invalid(format!("`{module}` is not a valid module id"));
        }
        let Some(desired) = content.get("properties.desired").and_then(Value::as_object) else {
            return invalid(format!("modulesContent.{module} has no `properties.desired` object"));
        };
        if module == "$edgeHub" {
            route_table(desired).map_err(|e| ApplyError::Invalid(format!("modulesContent.$edgeHub: {e}")))?;
        }
        desired_by_module.push((module.clone(), Value::Object(desired.clone())));
    }
    let mut listed: Vec<String> = modules
        .get("$edgeAgent")
        .and_then(|a| a.get("properties.desired"))
        .and_then(|d| d.get("modules"))
        .and_then(Value::as_object)
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    if let Some(bad) = listed.iter().find(|m| !super::registry::valid_id(m) || m.starts_with('$')) {
        return invalid(format!("$edgeAgent lists module `{bad}`, which is not a valid module id"));
    }
    // Check every twin write against the twin rules before applying any.
    for (module, desired) in &desired_by_module {
        let mut probe = super::twin_doc::TwinDoc::new(super::clock::wall());
        if let Err(e) = probe.replace_service(None, Some(desired), super::clock::wall()) {
            return invalid(format!("modulesContent.{module}: {e}"));
        }
    }
    listed.extend(SYSTEM_MODULES.iter().map(|s| s.to_string()));
    listed.extend(desired_by_module.iter().map(|(m, _)| m.clone()));
    let mut created = false;
    for m in &listed {
        created |= hub.registry.get(device_id, Some(m)).is_none();
        if ensure_module(hub, device_id, m).is_none() {
            return Err(ApplyError::DeviceNotFound);
        }
    }
    if created {
        hub.refresh_identity_gauges();
    }
    for (module, desired) in desired_by_module {
        let Some(identity) = hub.registry.get(device_id, Some(&module)) else { continue };
        let mut st = identity.lock();
        let (tags, _) = st.twin.service_parts();
        let now = super::clock::wall();
        let change = match st.twin.replace_service(Some(&tags), Some(&desired), now) {
            Ok(change) => change,
            // Checked above; a twin that changed shape since is refused now.
            Err(e) => return invalid(format!("modulesContent.{module}: {e}")),
        };
        // A twin replaced by a deployment is a twin change event, as a service PUT is.
        let (tags, props) = st.twin.service_parts();
        let body = super::events::twin_body(st.twin.version, Some(tags), props.get("desired").cloned(), None);
        hub.events.twin_changed(&identity, super::events::TwinOp::Replace, body, now);
        hub.store.identity(&identity);
        if let Some(change) = change {
            hub.notify_desired(&st, &change);
        }
    }
    refresh(hub, device_id);
    Ok(())
}

/// Where a message from `identity` goes, when it is a module of an Edge device with routes;
/// `None` means the ordinary path (upstream). Takes no identity lock.
pub fn plan(hub: &HubState, identity: &Identity, properties: &PropertyBag, body: &[u8]) -> Option<Plan> {
    let module_id = identity.module_id.as_deref()?;
    let table = hub.edge.get(&identity.device_id)?;
    Some(table.plan(&ModuleMessage { properties, device_id: &identity.device_id, module_id, body }))
}

/// Delivers a routed message to each input of `plan`: queued on the target module (created by a
/// deployment or not: a missing module is counted, as Edge logs it), with the sender as `$.cdid` /
/// `$.cmid` and the message's own properties, its output name dropped. Call with no identity lock
/// held: it locks each target in turn.
pub fn deliver(hub: &HubState, sender: &Identity, plan: &Plan, properties: &PropertyBag, body: &Bytes) {
    if plan.inputs.is_empty() {
        if !plan.upstream {
            hub.metrics.edge_routed.with_label_values(&["unrouted"]).inc();
        }
        return;
    }
    let Some(table) = hub.edge.get(&sender.device_id) else { return };
    let Some(sender_module) = sender.module_id.as_deref() else { return };
    let bag = crate::iot::route::input_properties(properties, &sender.device_id, sender_module);
    for (module, input) in &plan.inputs {
        let Some(target) = hub.registry.get(&sender.device_id, Some(module)) else {
            hub.metrics.edge_routed.with_label_values(&["no_such_module"]).inc();
            continue;
        };
        let ttl = table.ttl_for(module, input);
        let mut st = target.lock();
        let dropped = st.c2d.enqueue_input(
            input,
            bag.clone(),
            body.clone(),
            ttl,
            MAX_QUEUED_INPUTS,
            super::clock::now(),
            super::clock::wall(),
        );
        if dropped {
            hub.metrics.edge_routed.with_label_values(&["input_overflow"]).inc();
        }
        hub.metrics.edge_routed.with_label_values(&["module_input"]).inc();
        hub.push_c2d(&target, &mut st);
        hub.store.identity(&target);
    }
}
