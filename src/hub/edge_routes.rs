//! One IoT Edge device's route table, as its `$edgeHub` module twin declares it (`routes`,
//! `storeAndForwardConfiguration.timeToLiveSecs`), and the tables of every Edge device the hub
//! knows. Which sinks a message reaches is decided here; delivering it is `edge.rs`'s.
//!
//! Source: Microsoft's "Deploy modules and establish routes in IoT Edge" and "Properties of the
//! IoT Edge agent and IoT Edge hub module twins" (routes as strings or, schema 1.1, objects with
//! `route`, `priority`, `timeToLiveSecs`; 0 means the store-and-forward default).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_json::{Map, Value};

use crate::iot::route::{ModuleMessage, Plan, Route, Sink};

/// Store-and-forward time to live when the deployment names none (Edge hub's default: 7200 s).
pub const DEFAULT_TTL: Duration = Duration::from_secs(7200);

/// One Edge device's routes, as its `$edgeHub` twin declares them.
#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<(String, Route, Option<Duration>)>,
    /// Store-and-forward time to live for routes that name none.
    pub ttl: Duration,
}

/// A deployment or route the emulator refuses (400 `ArgumentInvalid`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DeploymentError(pub String);

/// Reads a route table from `$edgeHub` desired properties. Routes are strings or (schema 1.1)
/// objects `{"route": "...", "priority": n, "timeToLiveSecs": n}`.
///
/// # Errors
/// A route that does not parse (named, with its column), a route entry of another shape, or a
/// negative or non-integer time to live.
pub fn route_table(desired: &Map<String, Value>) -> Result<RouteTable, DeploymentError> {
    let bad = |m: String| Err(DeploymentError(m));
    let secs = |v: &Value, what: &str| -> Result<Option<Duration>, DeploymentError> {
        match v {
            Value::Null => Ok(None),
            v => v
                .as_u64()
                .map(|s| Some(Duration::from_secs(s)))
                .ok_or_else(|| DeploymentError(format!("{what} must be a whole number of seconds"))),
        }
    };
    let ttl = match desired.get("storeAndForwardConfiguration").and_then(|s| s.get("timeToLiveSecs")) {
        Some(v) => secs(v, "storeAndForwardConfiguration.timeToLiveSecs")?.unwrap_or(DEFAULT_TTL),
        None => DEFAULT_TTL,
    };
    let mut routes = Vec::new();
    let Some(declared) = desired.get("routes") else { return Ok(RouteTable { routes, ttl }) };
    let Some(declared) = declared.as_object() else { return bad("$edgeHub routes must be an object".into()) };
    for (name, entry) in declared {
        let (text, route_ttl) = match entry {
            Value::String(s) => (s.as_str(), None),
            Value::Object(o) => match o.get("route").and_then(Value::as_str) {
                Some(s) => (
                    s,
                    secs(o.get("timeToLiveSecs").unwrap_or(&Value::Null), &format!("route {name}: timeToLiveSecs"))?,
                ),
                None => return bad(format!("route {name} must be a string or an object with a `route` string")),
            },
            _ => return bad(format!("route {name} must be a string or an object with a `route` string")),
        };
        let route = Route::parse(text).map_err(|e| DeploymentError(format!("route {name}: {e}: {text}")))?;
        // Edge: a route time to live of 0 means the store-and-forward default.
        routes.push((name.clone(), route, route_ttl.filter(|d| !d.is_zero())));
    }
    Ok(RouteTable { routes, ttl })
}

/// The route tables of the hub's Edge devices, by device id.
#[derive(Debug, Default)]
pub struct EdgeRoutes {
    tables: RwLock<HashMap<String, Arc<RouteTable>>>,
    /// Whether any device has a table: the one check a message of a hub without Edge devices pays.
    any: AtomicBool,
}

impl EdgeRoutes {
    pub fn get(&self, device_id: &str) -> Option<Arc<RouteTable>> {
        if !self.any.load(Ordering::Relaxed) {
            return None;
        }
        self.tables.read().unwrap_or_else(|p| p.into_inner()).get(device_id).cloned()
    }

    pub fn set(&self, device_id: &str, table: Option<RouteTable>) {
        // A poisoned lock still holds a consistent map: every write is one insert or remove.
        let mut tables = self.tables.write().unwrap_or_else(|p| p.into_inner());
        match table {
            Some(t) => tables.insert(device_id.to_string(), Arc::new(t)),
            None => tables.remove(device_id),
        };
        self.any.store(!tables.is_empty(), Ordering::Relaxed);
    }
}

impl RouteTable {
    /// Where a module's message goes by these routes (`iot::route::plan`).
    pub fn plan(&self, message: &ModuleMessage<'_>) -> Plan {
        crate::iot::route::plan(self.routes.iter().map(|(_, r, _)| r), message)
    }

    /// How long a message for `module`'s `input` is kept: the first route to it that names a
    /// time to live, else the store-and-forward setting.
    pub fn ttl_for(&self, module: &str, input: &str) -> Duration {
        self.routes
            .iter()
            .find_map(|(_, r, t)| match &r.sink {
                Sink::ModuleInput { module: m, input: i } if m == module && i == input => *t,
                _ => None,
            })
            .unwrap_or(self.ttl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn desired(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn tables_read_string_and_object_routes_and_the_ttl() {
        let t = route_table(&desired(json!({
            "schemaVersion": "1.1",
            "routes": {
                "sensorToFilter": "FROM /messages/modules/tempSensor/outputs/temperatureOutput INTO BrokeredEndpoint(\"/modules/filterModule/inputs/input1\")",
                "filterToIoTHub": {"route": "FROM /messages/modules/filterModule/outputs/output1 INTO $upstream", "priority": 0, "timeToLiveSecs": 60}
            },
            "storeAndForwardConfiguration": {"timeToLiveSecs": 300}
        })))
        .unwrap();
        assert_eq!(t.routes.len(), 2);
        assert_eq!(t.ttl, Duration::from_secs(300));
        let ttl_of = |name: &str| t.routes.iter().find(|(n, _, _)| n == name).unwrap().2;
        assert_eq!(ttl_of("filterToIoTHub"), Some(Duration::from_secs(60)));
        assert_eq!(ttl_of("sensorToFilter"), None);
        assert_eq!(route_table(&desired(json!({}))).unwrap().ttl, DEFAULT_TTL);
    }

    #[test]
    fn bad_tables_name_the_route_and_the_column() {
        for (d, needle) in [
            (json!({"routes": {"r1": "FROM /messages/* WHERE a = 1 INTO $upstream"}}), "route r1: at position 26"),
            (json!({"routes": {"r2": 5}}), "route r2 must be"),
            (json!({"routes": ["FROM /* INTO $upstream"]}), "must be an object"),
            (json!({"routes": {"r3": {"priority": 1}}}), "route r3 must be"),
            (json!({"storeAndForwardConfiguration": {"timeToLiveSecs": -5}}), "whole number"),
            (
                json!({"routes": {"r4": {"route": "FROM /* INTO $upstream", "timeToLiveSecs": "x"}}}),
                "route r4: timeToLiveSecs",
            ),
        ] {
            let e = route_table(&desired(d.clone())).unwrap_err();
            assert!(e.0.contains(needle), "{d}: {e}");
        }
    }
}
