//! The fleet as a simulated IoT Edge device's Edge hub (`routing = "fleet"`, the default against
//! Azure, where a simulated Edge device has no Edge hub of its own). A module's outgoing message
//! is evaluated against the device's routes with the protocol core's route engine
//! (`iot::route`): `$upstream` sends it to the hub as the module's telemetry, and
//! `BrokeredEndpoint("/modules/{m}/inputs/{i}")` hands it in process to the sibling module's
//! inbox, as Edge hub would deliver it (`$.cdid`/`$.cmid` and the original properties).
//!
//! As Edge hub does, a message goes to each endpoint once however many routes take it there, and
//! a message no route takes goes nowhere. Inboxes are bounded ([`INBOX_CAPACITY`]); unlike Edge
//! hub's store-and-forward, a message for a module that is not running or whose inbox is full is
//! dropped and counted.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::iot::property_bag::PropertyBag;
use crate::iot::route::{ModuleMessage, Plan, Route};
use crate::metrics::FleetMetrics;

/// Messages one module input queue holds before further deliveries are dropped.
pub const INBOX_CAPACITY: usize = 1024;

/// A message a route delivers to a module input (the core takes it as `Inbound::Input`).
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub input: String,
    /// The sender (`$.cdid`, `$.cmid`) and the original properties.
    pub properties: PropertyBag,
    pub payload: Bytes,
}

/// Messages waiting for one module, and the token that wakes its session when one arrives.
#[derive(Debug, Default)]
pub struct Inbox {
    queue: Mutex<VecDeque<Delivery>>,
    wake: Mutex<Option<CancellationToken>>,
}

impl Inbox {
    /// A token for the session to wait on: a child of `cancel`, fired when a message arrives. Arm
    /// before taking what is queued, so a message that arrives between the two wakes the wait.
    pub fn arm(&self, cancel: &CancellationToken) -> CancellationToken {
        let mut wake = self.wake.lock().unwrap_or_else(|p| p.into_inner());
        match wake.as_ref() {
            Some(t) if !t.is_cancelled() => t.clone(),
            _ => {
                let t = cancel.child_token();
                *wake = Some(t.clone());
                t
            }
        }
    }

    /// Everything queued, oldest first.
    pub fn take(&self) -> VecDeque<Delivery> {
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Queues a message; false when the inbox is full.
    fn push(&self, message: Delivery) -> bool {
        {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            if q.len() >= INBOX_CAPACITY {
                return false;
            }
            q.push_back(message);
        }
        if let Some(t) = self.wake.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            t.cancel();
        }
        true
    }
}

/// A module by device and module id.
type ModuleKey = (Arc<str>, Arc<str>);

/// The running modules with inputs, fleet-wide.
#[derive(Debug, Default)]
pub struct Inboxes {
    map: Mutex<HashMap<ModuleKey, Arc<Inbox>>>,
}

impl Inboxes {
    /// A new inbox for a module task that starts (replacing one a stopped task left).
    pub fn register(&self, device: &Arc<str>, module: &Arc<str>) -> Arc<Inbox> {
        let inbox = Arc::new(Inbox::default());
        self.map.lock().unwrap_or_else(|p| p.into_inner()).insert((device.clone(), module.clone()), inbox.clone());
        inbox
    }

    /// The module's task ends: its inbox goes, unless a newer task of the same module has
    /// registered its own since (a reload restarts a changed identity).
    pub fn unregister(&self, device: &Arc<str>, module: &Arc<str>, inbox: &Arc<Inbox>) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let key = (device.clone(), module.clone());
        if map.get(&key).is_some_and(|i| Arc::ptr_eq(i, inbox)) {
            map.remove(&key);
        }
    }

    fn get(&self, device: &str, module: &str) -> Option<Arc<Inbox>> {
        let key: ModuleKey = (Arc::from(device), Arc::from(module));
        self.map.lock().unwrap_or_else(|p| p.into_inner()).get(&key).cloned()
    }
}

/// A module of an Edge device the fleet routes for: who it is and its device's routes.
#[derive(Debug, Clone)]
pub struct EdgeRole {
    pub device_id: Arc<str>,
    pub module_id: Arc<str>,
    pub routes: Arc<[Route]>,
}

impl EdgeRole {
    /// Routes one outgoing message: delivers it to the sibling inboxes the routes name, and says
    /// whether it also goes upstream (the caller sends it as the module's telemetry).
    pub fn route(&self, inboxes: &Inboxes, metrics: &FleetMetrics, properties: &PropertyBag, body: &Bytes) -> bool {
        let message = ModuleMessage { properties, device_id: &self.device_id, module_id: &self.module_id, body };
        let Plan { upstream, inputs } = crate::iot::route::plan(self.routes.iter(), &message);
        if upstream {
            metrics.edge_routed("upstream");
        }
        if !upstream && inputs.is_empty() {
            metrics.edge_routed("unrouted");
        }
        for (module, input) in &inputs {
            let Some(inbox) = inboxes.get(&self.device_id, module) else {
                metrics.edge_routed("no_receiver");
                continue;
            };
            let bag = crate::iot::route::input_properties(properties, &self.device_id, &self.module_id);
            let message = Delivery { input: input.clone(), properties: bag, payload: body.clone() };
            metrics.edge_routed(if inbox.push(message) { "module_input" } else { "inbox_full" });
        }
        upstream
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role(routes: &[&str]) -> EdgeRole {
        EdgeRole {
            device_id: "edge-1".into(),
            module_id: "tempSensor".into(),
            routes: routes.iter().map(|r| Route::parse(r).unwrap()).collect(),
        }
    }

    fn bag(pairs: &[(&str, &str)]) -> PropertyBag {
        let mut b = PropertyBag::default();
        for (k, v) in pairs {
            b.push(*k, *v);
        }
        b
    }

    #[test]
    fn a_brokered_endpoint_delivers_to_the_sibling_with_the_sender_and_the_original_properties() {
        let (inboxes, m) = (Inboxes::default(), FleetMetrics::default());
        let filter = inboxes.register(&"edge-1".into(), &"filterModule".into());
        let r = role(&[
            r#"FROM /messages/modules/tempSensor/outputs/temperatureOutput INTO BrokeredEndpoint("/modules/filterModule/inputs/input1")"#,
            "FROM /messages/modules/filterModule/outputs/output1 INTO $upstream",
        ]);
        let props = bag(&[("$.ct", "application/json"), ("$.on", "temperatureOutput"), ("site", "7")]);
        let up = r.route(&inboxes, &m, &props, &Bytes::from_static(b"{\"t\":1}"));
        assert!(!up, "only the filter's output goes upstream");
        let got: Vec<_> = filter.take().into_iter().collect();
        let [Delivery { input, properties, payload }] = got.as_slice() else { panic!("{got:?}") };
        assert_eq!((input.as_str(), &payload[..]), ("input1", &b"{\"t\":1}"[..]));
        assert_eq!(properties.get("$.cdid"), Some("edge-1"));
        assert_eq!(properties.get("$.cmid"), Some("tempSensor"));
        assert_eq!(properties.get("site"), Some("7"));
        assert_eq!(properties.get("$.on"), None);
        assert_eq!(m.edge_routed_count("module_input"), 1);
        // Another output of the sensor: no route takes it.
        let other = bag(&[("$.on", "other")]);
        assert!(!r.route(&inboxes, &m, &other, &Bytes::new()));
        assert_eq!(m.edge_routed_count("unrouted"), 1);
    }

    #[test]
    fn conditions_and_upstream_follow_the_routes_and_each_endpoint_gets_a_message_once() {
        let (inboxes, m) = (Inboxes::default(), FleetMetrics::default());
        let r = role(&[
            "FROM /messages/* WHERE site = '7' INTO $upstream",
            "FROM /messages/modules/tempSensor/* INTO $upstream",
            r#"FROM /* WHERE $connectionModuleId = 'tempSensor' INTO BrokeredEndpoint("/modules/gone/inputs/x")"#,
        ]);
        assert!(r.route(&inboxes, &m, &bag(&[("site", "7")]), &Bytes::new()));
        assert_eq!(m.edge_routed_count("upstream"), 1, "two routes to $upstream send once");
        assert_eq!(m.edge_routed_count("no_receiver"), 1);
    }

    #[test]
    fn a_full_inbox_drops_and_counts_and_a_replaced_inbox_is_not_unregistered_by_the_old_task() {
        let (inboxes, m) = (Inboxes::default(), FleetMetrics::default());
        let old = inboxes.register(&"edge-1".into(), &"f".into());
        let r = role(&[r#"FROM /* INTO BrokeredEndpoint("/modules/f/inputs/i")"#]);
        for _ in 0..INBOX_CAPACITY + 3 {
            r.route(&inboxes, &m, &PropertyBag::default(), &Bytes::new());
        }
        assert_eq!(m.edge_routed_count("inbox_full"), 3);
        assert_eq!(old.take().len(), INBOX_CAPACITY);
        let new = inboxes.register(&"edge-1".into(), &"f".into());
        inboxes.unregister(&"edge-1".into(), &"f".into(), &old);
        r.route(&inboxes, &m, &PropertyBag::default(), &Bytes::new());
        assert_eq!(new.take().len(), 1);
    }

    #[test]
    fn an_arrival_wakes_the_armed_token() {
        let (inboxes, m) = (Inboxes::default(), FleetMetrics::default());
        let inbox = inboxes.register(&"edge-1".into(), &"f".into());
        let cancel = CancellationToken::new();
        let wake = inbox.arm(&cancel);
        assert!(!wake.is_cancelled());
        role(&[r#"FROM /* INTO BrokeredEndpoint("/modules/f/inputs/i")"#]).route(
            &inboxes,
            &m,
            &PropertyBag::default(),
            &Bytes::new(),
        );
        assert!(wake.is_cancelled());
        assert!(!cancel.is_cancelled(), "waking a module does not stop it");
        assert!(!inbox.arm(&cancel).is_cancelled(), "re-armed after a wake");
    }
}
