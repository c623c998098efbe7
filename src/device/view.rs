//! What the console sees of each identity, and how it reaches a live one: its state and a bounded
//! history of state changes, counters, the last telemetry bodies, the last commands it answered,
//! and a handle that ends its current connection (for a console disconnect or reboot).
//!
//! Written by the identity's own task and read rarely (a console request), so every lock here is
//! uncontended on the hot path; counters are relaxed atomics and the rings have fixed capacities
//! (a telemetry body is a `Bytes`, shared with the outbox, not copied).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::metrics::DeviceState;

/// State changes kept per identity.
pub const HISTORY: usize = 16;
/// Telemetry bodies kept per identity.
pub const LAST_TELEMETRY: usize = 5;
/// Commands kept per identity.
pub const LAST_COMMANDS: usize = 8;

/// One telemetry message as generated: when (wall time) and its body.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: SystemTime,
    pub body: Bytes,
}

/// A command the identity answered: its name, the status it answered, when.
#[derive(Debug, Clone)]
pub struct CommandRecord {
    pub at: SystemTime,
    pub name: String,
    pub status: u16,
}

/// What the console asks of a live identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Close the connection; the identity reconnects after a short backoff.
    Disconnect,
    /// Close the connection and stay down for the given time, as a reboot.
    Reboot(Duration),
}

/// Counters of one identity (since the fleet started it).
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Counters {
    pub generated: u64,
    pub acked: u64,
    pub c2d_received: u64,
    pub commands: u64,
    pub desired_patches: u64,
    pub connects: u64,
}

/// One identity as the console sees it.
pub struct DeviceView {
    /// `device` or `device/module`.
    pub key: Arc<str>,
    pub device_id: Arc<str>,
    pub module_id: Option<Arc<str>>,
    pub template: Arc<str>,
    /// How it gets onto the hub: `dps-group`, `dps-individual` or `registry`; never a key.
    pub credentials: &'static str,
    pub transport: &'static str,
    state: AtomicU8,
    generated: AtomicU64,
    acked: AtomicU64,
    c2d: AtomicU64,
    commands_answered: AtomicU64,
    desired: AtomicU64,
    connects: AtomicU64,
    history: Mutex<VecDeque<(SystemTime, DeviceState)>>,
    telemetry: Mutex<VecDeque<Sample>>,
    commands: Mutex<VecDeque<CommandRecord>>,
    /// The current connection's end switch and what the console asked for; `None` offline.
    control: Mutex<(Option<CancellationToken>, Option<Control>)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn push_bounded<T>(q: &mut VecDeque<T>, cap: usize, v: T) {
    if q.len() == cap {
        q.pop_front();
    }
    q.push_back(v);
}

fn state_index(s: DeviceState) -> u8 {
    DeviceState::ALL.iter().position(|x| *x == s).unwrap_or(0) as u8
}

impl DeviceView {
    pub fn new(
        device_id: Arc<str>,
        module_id: Option<Arc<str>>,
        template: Arc<str>,
        credentials: &'static str,
        transport: &'static str,
    ) -> DeviceView {
        let key = crate::iot::username::client_id(&device_id, module_id.as_deref()).into();
        DeviceView {
            key,
            device_id,
            module_id,
            template,
            credentials,
            transport,
            state: AtomicU8::new(state_index(DeviceState::Provisioning)),
            generated: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            c2d: AtomicU64::new(0),
            commands_answered: AtomicU64::new(0),
            desired: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            history: Mutex::new(VecDeque::new()),
            telemetry: Mutex::new(VecDeque::new()),
            commands: Mutex::new(VecDeque::new()),
            control: Mutex::new((None, None)),
        }
    }

    pub fn state(&self) -> DeviceState {
        DeviceState::ALL.get(self.state.load(Ordering::Relaxed) as usize).copied().unwrap_or(DeviceState::Provisioning)
    }

    /// The identity moved to `s` (only called on a change).
    pub fn set_state(&self, s: DeviceState) {
        self.state.store(state_index(s), Ordering::Relaxed);
        if s == DeviceState::Connected {
            self.connects.fetch_add(1, Ordering::Relaxed);
        }
        push_bounded(&mut lock(&self.history), HISTORY, (SystemTime::now(), s));
    }

    /// State changes, oldest first.
    pub fn history(&self) -> Vec<(SystemTime, DeviceState)> {
        lock(&self.history).iter().copied().collect()
    }

    /// A reading was generated (buffered for the hub).
    pub fn generated(&self, body: &Bytes) {
        self.generated.fetch_add(1, Ordering::Relaxed);
        push_bounded(&mut lock(&self.telemetry), LAST_TELEMETRY, Sample { at: SystemTime::now(), body: body.clone() });
    }

    pub fn acked(&self) {
        self.acked.fetch_add(1, Ordering::Relaxed);
    }

    pub fn c2d_received(&self) {
        self.c2d.fetch_add(1, Ordering::Relaxed);
    }

    pub fn desired_patch(&self) {
        self.desired.fetch_add(1, Ordering::Relaxed);
    }

    pub fn command(&self, name: &str, status: u16) {
        self.commands_answered.fetch_add(1, Ordering::Relaxed);
        let r = CommandRecord { at: SystemTime::now(), name: name.to_owned(), status };
        push_bounded(&mut lock(&self.commands), LAST_COMMANDS, r);
    }

    pub fn counters(&self) -> Counters {
        Counters {
            generated: self.generated.load(Ordering::Relaxed),
            acked: self.acked.load(Ordering::Relaxed),
            c2d_received: self.c2d.load(Ordering::Relaxed),
            commands: self.commands_answered.load(Ordering::Relaxed),
            desired_patches: self.desired.load(Ordering::Relaxed),
            connects: self.connects.load(Ordering::Relaxed),
        }
    }

    /// The last telemetry bodies, oldest first.
    pub fn last_telemetry(&self) -> Vec<Sample> {
        lock(&self.telemetry).iter().cloned().collect()
    }

    /// The last commands answered, oldest first.
    pub fn last_commands(&self) -> Vec<CommandRecord> {
        lock(&self.commands).iter().cloned().collect()
    }

    /// A connection is up: `end` ends it (a child of the identity's stop token).
    pub fn online(&self, end: CancellationToken) {
        *lock(&self.control) = (Some(end), None);
    }

    /// The connection ended: what the console asked for, if it was the console that ended it.
    pub fn offline(&self) -> Option<Control> {
        let mut c = lock(&self.control);
        c.0 = None;
        c.1.take()
    }

    /// Asks the live connection to end for `what`; false when the identity is not connected.
    pub fn request(&self, what: Control) -> bool {
        let mut c = lock(&self.control);
        match &c.0 {
            Some(end) if !end.is_cancelled() => {
                end.cancel();
                c.1 = Some(what);
                true
            }
            _ => false,
        }
    }
}

/// Every identity of the fleet by key (`device[/module]`), in key order so that a page of the
/// devices table and an id-prefix filter are a range walk.
#[derive(Default)]
pub struct Views {
    map: RwLock<BTreeMap<Arc<str>, Arc<DeviceView>>>,
}

/// A page of identities: those matching, and how many matched in all.
pub struct Page {
    pub total: usize,
    pub items: Vec<Arc<DeviceView>>,
}

/// What a devices page selects; `None` selects everything.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub prefix: Option<String>,
    pub template: Option<String>,
    pub state: Option<DeviceState>,
}

impl Views {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<Arc<str>, Arc<DeviceView>>> {
        self.map.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert(&self, v: Arc<DeviceView>) {
        self.map.write().unwrap_or_else(|p| p.into_inner()).insert(v.key.clone(), v);
    }

    /// Takes `v` out, unless a newer view of the same identity has replaced it.
    pub fn remove(&self, v: &Arc<DeviceView>) {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        if map.get(&v.key).is_some_and(|x| Arc::ptr_eq(x, v)) {
            map.remove(&v.key);
        }
    }

    pub fn get(&self, key: &str) -> Option<Arc<DeviceView>> {
        self.read().get(key).cloned()
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The templates' names, sorted, each once.
    pub fn templates(&self) -> Vec<Arc<str>> {
        let mut t: Vec<Arc<str>> = self.read().values().map(|v| v.template.clone()).collect();
        t.sort();
        t.dedup();
        t
    }

    /// Identities matching `f` in key order: `limit` of them from the `offset`-th match.
    pub fn page(&self, f: &Filter, offset: usize, limit: usize) -> Page {
        let map = self.read();
        let prefix = f.prefix.as_deref().unwrap_or("");
        let mut total = 0;
        let mut items = Vec::with_capacity(limit.min(1000));
        let matching = map
            .range::<str, _>((std::ops::Bound::Included(prefix), std::ops::Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v)
            .filter(|v| f.template.as_deref().is_none_or(|t| *v.template == *t))
            .filter(|v| f.state.is_none_or(|s| v.state() == s));
        for v in matching {
            if total >= offset && items.len() < limit {
                items.push(v.clone());
            }
            total += 1;
        }
        Page { total, items }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(id: &str, template: &str) -> Arc<DeviceView> {
        Arc::new(DeviceView::new(id.into(), None, template.into(), "registry", "mqtt"))
    }

    #[test]
    fn pages_filter_by_prefix_template_and_state() {
        let views = Views::default();
        for i in 0..50 {
            views.insert(view(&format!("a-{i:03}"), "t1"));
            views.insert(view(&format!("b-{i:03}"), "t2"));
        }
        views.get("a-007").unwrap().set_state(DeviceState::Connected);
        let all = views.page(&Filter::default(), 95, 10);
        assert_eq!((all.total, all.items.len()), (100, 5));
        let a = views.page(&Filter { prefix: Some("a-0".into()), ..Default::default() }, 0, 3);
        assert_eq!(a.total, 50);
        assert_eq!(a.items.iter().map(|v| &*v.key).collect::<Vec<_>>(), ["a-000", "a-001", "a-002"]);
        let t2 = views.page(&Filter { template: Some("t2".into()), ..Default::default() }, 0, 1);
        assert_eq!((t2.total, &*t2.items[0].key), (50, "b-000"));
        let c = views.page(&Filter { state: Some(DeviceState::Connected), ..Default::default() }, 0, 10);
        assert_eq!(c.items.iter().map(|v| &*v.key).collect::<Vec<_>>(), ["a-007"]);
    }

    #[test]
    fn rings_are_bounded() {
        let v = view("d", "t");
        for i in 0..100u32 {
            v.generated(&Bytes::from(i.to_string()));
            v.command("blink", 200);
            v.set_state(if i % 2 == 0 { DeviceState::Connected } else { DeviceState::Backoff });
        }
        assert_eq!(v.last_telemetry().len(), LAST_TELEMETRY);
        assert_eq!(v.last_telemetry().last().unwrap().body, Bytes::from("99"));
        assert_eq!(v.last_commands().len(), LAST_COMMANDS);
        assert_eq!(v.history().len(), HISTORY);
        assert_eq!(v.counters().generated, 100);
        assert_eq!(v.counters().connects, 50);
        assert_eq!(v.history().last().unwrap().1, DeviceState::Backoff);
    }

    /// docs/console.md states what a view costs; this keeps the fixed part honest.
    #[test]
    fn a_view_is_small() {
        let fixed = std::mem::size_of::<DeviceView>();
        println!("DeviceView: {fixed} bytes");
        assert!(fixed <= 320, "{fixed}");
    }

    #[test]
    fn a_request_reaches_only_a_live_connection() {
        let v = view("d", "t");
        assert!(!v.request(Control::Disconnect));
        let end = CancellationToken::new();
        v.online(end.clone());
        assert!(v.request(Control::Reboot(Duration::from_secs(3))));
        assert!(end.is_cancelled());
        assert_eq!(v.offline(), Some(Control::Reboot(Duration::from_secs(3))));
        assert_eq!(v.offline(), None);
    }
}
