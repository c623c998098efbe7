//! One identity's session logic without I/O, whatever transport carries it. The core is told
//! what happened (the link came up, a message arrived, time passed) and answers by queueing on a
//! `Sink`, which only buffers: the link's own loop (`device/link/`) does the writing and reading.
//! So the same rules hold over MQTT, WebSockets and HTTPS, and tests drive them with a recording
//! sink and a paused clock.
//!
//! What it owns: the `Agent` (the scenario's behaviour), the `Outbox` (telemetry until
//! acknowledged), reported patches until the hub confirms them (each sent again without what a
//! newer patch set since), twin GET retries, and what the agent produced while offline.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::time::Instant;

use super::behaviour::{Agent, Out};
use super::outbox::{Outbox, Pushed};
use super::spec::Settings;
use crate::iot::property_bag::PropertyBag;
use crate::metrics::FleetMetrics;

/// What the core reads of the fleet: counters, the identity knobs, the run id of sequence stamps,
/// and whether readings have stopped (the end of a CI run).
#[derive(Clone, Copy)]
pub struct Ctx<'a> {
    pub metrics: &'a FleetMetrics,
    pub settings: &'a Settings,
    pub run_id: &'a str,
    pub quiesce: &'a AtomicBool,
    /// The module inboxes of the fleet's Edge routing.
    pub inboxes: &'a super::edge::Inboxes,
}

/// What a transport can carry besides telemetry. IoT Hub offers twins, desired-property pushes and
/// direct methods over MQTT and AMQP only ("Choose a device communication protocol": HTTPS has
/// none of them), so an HTTPS link reports `twin: false` and the core never asks it for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    pub twin: bool,
}

/// Where the core queues what to send. Implementations only buffer; nothing here waits.
pub trait Sink {
    /// Queues one device-to-cloud message (at least once); the returned tag comes back in
    /// `Inbound::Acked` or `Inbound::Rejected`. Tags are unique among unacknowledged messages.
    fn telemetry(&mut self, properties: &PropertyBag, body: Bytes) -> u16;
    /// Asks for the whole twin; answered by `Inbound::Twin`.
    fn twin_get(&mut self);
    /// Sends a reported-properties patch under request id `rid`; answered by `Inbound::Reported`.
    fn report(&mut self, rid: &str, patch: String);
    /// Answers direct method request `rid` with `status` and a JSON payload.
    fn method_response(&mut self, rid: &str, status: u16, payload: Bytes);
}

/// Something the hub sent or answered, in transport-neutral form.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    /// The hub holds telemetry message `tag` (MQTT PUBACK, HTTPS 204).
    Acked(u16),
    /// The hub refused telemetry message `tag` for good (HTTPS 400/413): sending it again cannot help.
    Rejected(u16),
    /// The answer to the twin GET: status and the twin document.
    Twin {
        status: u16,
        body: Bytes,
    },
    /// The answer to reported patch `rid`: 204 accepted, 429/5xx retry later, other 4xx refused.
    Reported {
        rid: String,
        status: u16,
    },
    /// A desired-properties patch; `version` from the topic when the transport carries it.
    Desired {
        version: Option<u64>,
        body: Bytes,
    },
    Method {
        name: String,
        rid: String,
        payload: Bytes,
    },
    C2d {
        properties: PropertyBag,
        payload: Bytes,
    },
    /// A message routed to one of this module's inputs (IoT Edge), by the hub or, in process, by
    /// the fleet's Edge routing (`device::edge`).
    Input {
        input: String,
        properties: PropertyBag,
        payload: Bytes,
    },
}

/// How a session ended.
#[derive(Debug)]
pub enum End {
    /// The identity is told to stop.
    Shutdown,
    /// The token is due for renewal.
    Renew,
    /// A command rebooted the device: down for `downtime`, then `answer` (if the command answers
    /// after the reboot) and the command's reboot properties.
    Reboot { downtime: Duration, method: String, answer: Option<Box<Out>> },
    /// The connection failed; the label is the `cause` of `fleetsim_reconnects_total`.
    Lost(&'static str),
    /// The hub no longer accepts this identity's credentials (an HTTPS 401/403/404 mid-session):
    /// the same path as a refused connect.
    Refused(String),
}

/// What one connection knows; made anew each time the link comes up.
#[derive(Debug, Default)]
struct Conn {
    caps: Option<Caps>,
    next_rid: u64,
    /// Reported patches awaiting the hub's answer, by request id number (`r{n}`): ordered, so
    /// that what a lost connection leaves unconfirmed is sent again oldest first and an older
    /// writable acknowledgement cannot overwrite a newer one.
    reports: BTreeMap<u64, Value>,
    /// Reported patches the hub throttled or failed, to send again at the given time, with the
    /// request number they were first sent under.
    report_retries: Vec<(Instant, u64, Value)>,
    /// For each reported property path (`reported::paths`), the request number of the latest
    /// patch that set it: a patch sent again loses the paths a newer one set since.
    latest_report: HashMap<String, u64>,
    /// Reported patches failed in a row: the backoff's exponent.
    report_failures: u32,
    /// When to ask for the twin again after the hub failed the last GET.
    twin_retry: Option<Instant>,
    twin_failures: u32,
}

/// One identity's state across connections.
pub struct Core {
    agent: Agent,
    outbox: Outbox,
    /// Reported-property patches the hub has not confirmed; sent again on the next connection.
    reports: Vec<Value>,
    /// What the agent produced while offline, to send once connected.
    after_connect: Vec<Out>,
    conn: Conn,
    /// Set for a module of an Edge device the fleet routes for: its messages go by the routes.
    edge: Option<super::edge::EdgeRole>,
    /// Set for such a module with inputs: what siblings route to it.
    inbox: Option<std::sync::Arc<super::edge::Inbox>>,
    /// What the console sees of this identity, when the fleet keeps views.
    view: Option<std::sync::Arc<super::view::DeviceView>>,
}

/// Full jitter under a cap: a uniformly random wait up to `base * 2^attempt`, at most `cap`.
pub fn full_jitter(base: Duration, cap: Duration, attempt: u32) -> Duration {
    let ceiling = base.saturating_mul(1u32 << attempt.min(20)).min(cap);
    ceiling.mul_f64(rand::random::<f64>())
}

impl Core {
    pub fn new(agent: Agent, outbox: Outbox) -> Core {
        Core {
            agent,
            outbox,
            reports: Vec::new(),
            after_connect: Vec::new(),
            conn: Conn::default(),
            edge: None,
            inbox: None,
            view: None,
        }
    }

    /// Tells `view` what this identity does from now on (counters, last readings, commands).
    pub fn observe(&mut self, view: std::sync::Arc<super::view::DeviceView>) {
        self.view = Some(view);
    }

    /// Makes this module's messages go by its Edge device's routes, with `inbox` receiving what
    /// the routes deliver to it (`device::edge`).
    pub fn route_as_edge(&mut self, role: super::edge::EdgeRole, inbox: Option<std::sync::Arc<super::edge::Inbox>>) {
        self.edge = Some(role);
        self.inbox = inbox;
    }

    /// For the session's wait: a token fired when a sibling delivers to this module (armed
    /// before the inbox is read), or `None` for identities without an inbox.
    pub fn arm_inbox(
        &self,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Option<tokio_util::sync::CancellationToken> {
        self.inbox.as_ref().map(|i| i.arm(cancel))
    }

    /// Handles what siblings delivered to this module's inputs.
    pub fn take_inputs(&mut self, ctx: Ctx<'_>, sink: &mut dyn Sink, now: Instant) -> Option<End> {
        let queued = self.inbox.as_ref()?.take();
        for d in queued {
            let ev = Inbound::Input { input: d.input, properties: d.properties, payload: d.payload };
            if let Some(end) = self.inbound(ctx, sink, ev, now) {
                return Some(end);
            }
        }
        None
    }

    /// A message the agent produced: buffered for the hub, or first routed when the fleet is
    /// this module's Edge hub (then only what a route sends `$upstream` is buffered).
    fn send(&mut self, ctx: Ctx<'_>, properties: PropertyBag, body: Bytes) {
        if let Some(role) = &self.edge
            && !role.route(ctx.inboxes, ctx.metrics, &properties, &body)
        {
            return;
        }
        self.enqueue(ctx, properties, body);
    }

    /// A re-created identity has a new twin, whose desired versions start over.
    pub fn forget_twin(&mut self) {
        self.agent.forget_twin();
    }

    /// Whether every reading is acknowledged (or dropped): a drain can stop.
    pub fn drained(&self) -> bool {
        self.outbox.is_empty()
    }

    /// The next time the core has something to do while connected.
    pub fn next_deadline(&self) -> Option<Instant> {
        [self.agent.next_deadline(), self.conn.twin_retry, self.conn.report_retries.iter().map(|(at, _, _)| *at).min()]
            .into_iter()
            .flatten()
            .min()
    }

    /// The next reading or timer while offline.
    pub fn next_deadline_offline(&self) -> Option<Instant> {
        self.agent.next_deadline()
    }

    /// Time passes while the identity is offline (under `drop_oldest`): readings go into the
    /// outbox, reports wait for the connection, command completions are counted; answers to
    /// requests from a connection that is gone have no one to go to.
    pub fn tick_offline(&mut self, ctx: Ctx<'_>, now: Instant) {
        for o in self.agent.on_tick(now) {
            match o {
                Out::Telemetry { properties, body } => self.send(ctx, properties, body),
                Out::Filtered => ctx.metrics.telemetry_filtered.inc(),
                Out::Input(outcome) => ctx.metrics.module_input(outcome.label()),
                Out::CommandRan { name, status } => {
                    if let Some(v) = &self.view {
                        v.command(&name, status);
                    }
                    ctx.metrics.command(&name, status)
                }
                r @ Out::Report(_) => self.after_connect.push(r),
                _ => {}
            }
        }
    }

    /// The device came back from a reboot: what it reports (and answers) once connected.
    pub fn rebooted(&mut self, method: &str, answer: Option<Box<Out>>) {
        self.after_connect.extend(answer.map(|a| *a));
        self.after_connect.extend(self.agent.after_reboot(method));
    }

    /// The link is up: ask for the twin, send again what the last connection left unconfirmed,
    /// then the start-up reports and what was held while offline. A reboot among them ends the
    /// session at once.
    pub fn connected(&mut self, ctx: Ctx<'_>, sink: &mut dyn Sink, caps: Caps, now: Instant) -> Option<End> {
        self.conn = Conn { caps: Some(caps), ..Conn::default() };
        if caps.twin {
            sink.twin_get();
        }
        for patch in std::mem::take(&mut self.reports) {
            self.report(sink, patch);
        }
        let startup = self.agent.startup();
        let held = std::mem::take(&mut self.after_connect);
        if let Some(end) = self.emit(ctx, sink, startup).or_else(|| self.emit(ctx, sink, held)) {
            return Some(end);
        }
        self.agent.on_connected(now);
        None
    }

    /// Everything due by `now`: readings, timers, a twin GET or reported patches to retry.
    pub fn tick(&mut self, ctx: Ctx<'_>, sink: &mut dyn Sink, now: Instant) -> Option<End> {
        let outs = self.agent.on_tick(now);
        if let Some(end) = self.emit(ctx, sink, outs) {
            return Some(end);
        }
        if self.conn.twin_retry.is_some_and(|at| now >= at) {
            self.conn.twin_retry = None;
            sink.twin_get();
        }
        if self.conn.report_retries.iter().any(|(at, _, _)| now >= *at) {
            let (mut due, later): (Vec<_>, Vec<_>) =
                self.conn.report_retries.drain(..).partition(|(at, _, _)| now >= *at);
            self.conn.report_retries = later;
            due.sort_by_key(|(_, n, _)| *n);
            for (_, n, patch) in due {
                if let Some(patch) = self.still_current(n, &patch) {
                    self.report(sink, patch);
                }
            }
        }
        None
    }

    /// What arrived from the hub.
    pub fn inbound(&mut self, ctx: Ctx<'_>, sink: &mut dyn Sink, ev: Inbound, now: Instant) -> Option<End> {
        let m = ctx.metrics;
        let outs = match ev {
            Inbound::Acked(tag) => {
                if let Some(sent) = self.outbox.acked(tag) {
                    m.telemetry_acked.inc();
                    if let Some(v) = &self.view {
                        v.acked();
                    }
                    m.telemetry_queued.dec();
                    m.puback_seconds.observe(now.saturating_duration_since(sent).as_secs_f64());
                    self.pump(ctx, sink);
                }
                return None;
            }
            Inbound::Rejected(tag) => {
                if self.outbox.acked(tag).is_some() {
                    m.telemetry_dropped("rejected_by_hub", 1);
                    m.telemetry_queued.dec();
                    self.pump(ctx, sink);
                }
                return None;
            }
            Inbound::Twin { status, body } => {
                m.twin("get", status);
                match serde_json::from_slice::<Value>(&body) {
                    Ok(twin) if status == 200 => {
                        self.conn.twin_failures = 0;
                        self.agent.on_twin(&twin, now)
                    }
                    _ => {
                        // Without its twin the device cannot catch up on desired properties.
                        self.conn.twin_failures += 1;
                        self.conn.twin_retry = Some(now + retry_delay(ctx.settings, self.conn.twin_failures));
                        Vec::new()
                    }
                }
            }
            Inbound::Reported { rid, status } => {
                m.twin("patch_reported", status);
                let n = rid.strip_prefix('r').and_then(|n| n.parse::<u64>().ok());
                match n.and_then(|n| self.conn.reports.remove(&n).map(|p| (n, p))) {
                    Some((n, patch)) if status == 429 || status >= 500 => {
                        self.conn.report_failures += 1;
                        let at = now + retry_delay(ctx.settings, self.conn.report_failures);
                        self.conn.report_retries.push((at, n, patch));
                    }
                    // Accepted, or refused for good (a 4xx other than 429: retrying cannot help).
                    Some(_) => self.conn.report_failures = 0,
                    None => {}
                }
                Vec::new()
            }
            Inbound::Desired { version, body } => {
                m.desired_patches.inc();
                if let Some(v) = &self.view {
                    v.desired_patch();
                }
                match serde_json::from_slice::<Value>(&body) {
                    Ok(patch) => {
                        let v = version.or_else(|| patch.get("$version").and_then(Value::as_u64)).unwrap_or(0);
                        self.agent.on_desired(&patch, v, now, false)
                    }
                    Err(_) => Vec::new(),
                }
            }
            Inbound::Method { name, rid, payload } => self.agent.on_method(&name, Some(&rid), &payload, now),
            Inbound::C2d { properties, payload } => {
                m.c2d_received.inc();
                if let Some(v) = &self.view {
                    v.c2d_received();
                }
                self.agent.on_c2d(&properties, &payload, now)
            }
            Inbound::Input { input, properties, payload } => self.agent.on_input(&input, &properties, &payload),
        };
        self.emit(ctx, sink, outs)
    }

    /// Writes buffered telemetry while the in-flight window has room.
    pub fn pump(&mut self, ctx: Ctx<'_>, sink: &mut dyn Sink) {
        let m = ctx.metrics;
        let now = Instant::now();
        while let Some(msg) = self.outbox.next_to_write(ctx.settings.max_inflight) {
            let tag = sink.telemetry(&msg.properties, msg.body.clone());
            if msg.written {
                m.telemetry_retransmits.inc();
            }
            m.telemetry_sent.inc();
            self.outbox.written(tag, msg, now);
        }
    }

    /// The connection is gone: what must outlive it goes back to the identity. Telemetry in
    /// flight is sent again; unconfirmed reports oldest first, each without what a newer patch set
    /// since, so that sending them again cannot undo a newer report.
    pub fn connection_closed(&mut self) {
        self.outbox.connection_lost();
        let conn = std::mem::take(&mut self.conn);
        let mut pending: Vec<(u64, Value)> = conn.reports.into_iter().collect();
        pending.extend(conn.report_retries.into_iter().map(|(_, n, p)| (n, p)));
        pending.sort_by_key(|(n, _)| *n);
        let latest = conn.latest_report;
        self.reports.extend(
            pending.into_iter().filter_map(|(n, p)| super::reported::without(&p, |path| superseded(&latest, path, n))),
        );
    }

    /// Gives up what is still buffered (the identity stops).
    pub fn abandon(&mut self, m: &FleetMetrics) {
        let (unwritten, in_doubt) = self.outbox.abandon();
        m.telemetry_dropped("shutdown", unwritten);
        m.telemetry_dropped("unacked_at_shutdown", in_doubt);
        m.telemetry_queued.sub((unwritten + in_doubt) as i64);
    }

    /// Numbers and buffers one reading, counting what the buffer policy did with it.
    fn enqueue(&mut self, ctx: Ctx<'_>, properties: PropertyBag, body: Bytes) {
        if ctx.quiesce.load(Ordering::Relaxed) {
            return;
        }
        let m = ctx.metrics;
        let run = ctx.settings.sequence_numbers.then_some(ctx.run_id);
        // A reference to the body (no copy) for the console's last readings.
        let seen = self.view.is_some().then(|| body.clone());
        let pushed = self.outbox.push(properties, body, |bag, n| {
            if let Some(run) = run {
                bag.push(crate::iot::sequence::PROPERTY, crate::iot::sequence::stamp(run, n));
                // Wall time, not the session clock: a back end on another machine compares it
                // with the hub's enqueued time.
                let sent = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
                bag.push(crate::iot::sequence::SENT_PROPERTY, sent.map(|d| d.as_millis()).unwrap_or(0).to_string());
            }
        });
        if let (Some(v), Some(body), Pushed::Queued | Pushed::DroppedOldest) = (&self.view, seen, &pushed) {
            v.generated(&body);
        }
        match pushed {
            Pushed::Queued => {
                m.telemetry_generated.inc();
                m.telemetry_queued.inc();
            }
            Pushed::DroppedOldest => {
                m.telemetry_generated.inc();
                m.telemetry_dropped("buffer_full", 1);
            }
            Pushed::Paused => m.telemetry_paused.inc(),
        }
    }

    fn report(&mut self, sink: &mut dyn Sink, patch: Value) {
        if !self.conn.caps.is_some_and(|c| c.twin) {
            // Validation keeps reported properties off transports without twins; a patch that
            // still comes has nowhere to go.
            tracing::debug!("a reported patch on a transport without twins is dropped");
            return;
        }
        self.conn.next_rid += 1;
        let n = self.conn.next_rid;
        for path in super::reported::paths(&patch) {
            self.conn.latest_report.insert(path, n);
        }
        sink.report(&format!("r{n}"), patch.to_string());
        self.conn.reports.insert(n, patch);
    }

    /// What is left of patch number `n` once the paths a later patch set are taken out.
    fn still_current(&self, n: u64, patch: &Value) -> Option<Value> {
        super::reported::without(patch, |path| superseded(&self.conn.latest_report, path, n))
    }

    /// Queues what the agent asked for; a reboot ends the session.
    fn emit(&mut self, ctx: Ctx<'_>, sink: &mut dyn Sink, outs: Vec<Out>) -> Option<End> {
        let m = ctx.metrics;
        for o in outs {
            match o {
                Out::Telemetry { properties, body } => self.send(ctx, properties, body),
                Out::Report(patch) => self.report(sink, patch),
                Out::MethodResponse { rid, status, payload } => sink.method_response(&rid, status, payload),
                Out::CommandRan { name, status } => {
                    tracing::info!(device = %self.agent.device_id(), module = ?self.agent.module_id(), command = %name, status, "command");
                    if let Some(v) = &self.view {
                        v.command(&name, status);
                    }
                    m.command(&name, status)
                }
                Out::Acked { status, latency } => {
                    m.writable_ack(status);
                    m.writable_ack_seconds.observe(latency.as_secs_f64());
                }
                Out::Filtered => m.telemetry_filtered.inc(),
                Out::Input(outcome) => m.module_input(outcome.label()),
                Out::Reboot { downtime, method, answer } => return Some(End::Reboot { downtime, method, answer }),
            }
        }
        self.pump(ctx, sink);
        None
    }
}

fn superseded(latest: &HashMap<String, u64>, path: &str, n: u64) -> bool {
    latest.get(path).is_some_and(|latest| *latest > n)
}

/// A retry delay for a throttled or failed twin request: full jitter, at least 100 ms.
fn retry_delay(s: &Settings, attempt: u32) -> Duration {
    full_jitter(s.backoff_base, s.backoff_cap, attempt).max(Duration::from_millis(100))
}

#[cfg(test)]
mod tests {
    //! The session rules driven by events on a paused clock, with a sink that records.

    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use crate::device::outbox::OfflinePolicy;
    use crate::scenario::model::Behaviour;

    #[derive(Debug, Clone, PartialEq)]
    enum Sent {
        Telemetry(u16, PropertyBag, Bytes),
        TwinGet,
        Report(String, Value),
        MethodResponse(String, u16),
    }

    /// A sink that keeps what it was asked to send, numbering telemetry as a link would.
    #[derive(Default)]
    struct Recorder {
        sent: Vec<Sent>,
        tag: u16,
    }

    impl Recorder {
        fn take(&mut self) -> Vec<Sent> {
            std::mem::take(&mut self.sent)
        }
    }

    impl Sink for Recorder {
        fn telemetry(&mut self, properties: &PropertyBag, body: Bytes) -> u16 {
            self.tag += 1;
            self.sent.push(Sent::Telemetry(self.tag, properties.clone(), body));
            self.tag
        }
        fn twin_get(&mut self) {
            self.sent.push(Sent::TwinGet);
        }
        fn report(&mut self, rid: &str, patch: String) {
            self.sent.push(Sent::Report(rid.to_owned(), serde_json::from_str(&patch).unwrap()));
        }
        fn method_response(&mut self, rid: &str, status: u16, _payload: Bytes) {
            self.sent.push(Sent::MethodResponse(rid.to_owned(), status));
        }
    }

    struct Fixture {
        metrics: FleetMetrics,
        settings: Settings,
        quiesce: AtomicBool,
        inboxes: crate::device::edge::Inboxes,
    }

    impl Fixture {
        fn new(max_inflight: usize) -> Fixture {
            let settings = Settings { max_inflight, ..Settings::default() };
            Fixture {
                metrics: FleetMetrics::default(),
                settings,
                quiesce: AtomicBool::new(false),
                inboxes: Default::default(),
            }
        }
        fn ctx(&self) -> Ctx<'_> {
            Ctx {
                metrics: &self.metrics,
                settings: &self.settings,
                run_id: "run1",
                quiesce: &self.quiesce,
                inboxes: &self.inboxes,
            }
        }
    }

    fn behaviour(toml: &str) -> Arc<Behaviour> {
        let text = format!("[[devices]]\nname = \"t\"\ncount = 1\nid = \"d{{n}}\"\n{toml}");
        let (mut templates, problems) = crate::scenario::schema::load_text(std::path::Path::new("t.toml"), text);
        assert!(problems.is_empty(), "{problems:?}");
        Arc::new(templates.remove(0).behaviour)
    }

    fn core(b: Arc<Behaviour>) -> Core {
        let agent = Agent::new(b, "d1".into(), None, 1, Instant::now());
        Core::new(agent, Outbox::new(OfflinePolicy::DropOldest, 16))
    }

    const MQTT: Caps = Caps { twin: true };
    const HTTPS: Caps = Caps { twin: false };

    fn telemetry_tags(sent: &[Sent]) -> Vec<u16> {
        sent.iter()
            .filter_map(|s| match s {
                Sent::Telemetry(tag, ..) => Some(*tag),
                _ => None,
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_asks_for_the_twin_and_reports_start_up_properties() {
        let f = Fixture::new(4);
        let mut c = core(behaviour("[devices.reported]\nfirmware = \"1.0\"\n"));
        let mut sink = Recorder::default();
        assert!(c.connected(f.ctx(), &mut sink, MQTT, Instant::now()).is_none());
        assert_eq!(sink.take(), vec![Sent::TwinGet, Sent::Report("r1".into(), json!({"firmware": "1.0"}))]);
    }

    #[tokio::test(start_paused = true)]
    async fn without_twins_nothing_twin_shaped_is_sent() {
        let f = Fixture::new(4);
        let mut c = core(behaviour("[devices.reported]\nfirmware = \"1.0\"\n"));
        let mut sink = Recorder::default();
        assert!(c.connected(f.ctx(), &mut sink, HTTPS, Instant::now()).is_none());
        assert_eq!(sink.take(), vec![]);
    }

    #[tokio::test(start_paused = true)]
    async fn telemetry_keeps_to_the_window_and_is_stamped_and_counted() {
        let f = Fixture::new(2);
        let mut c = core(behaviour("[devices.telemetry]\ninterval = \"1s\"\nfields = { t = 1 }\n"));
        let mut sink = Recorder::default();
        c.connected(f.ctx(), &mut sink, HTTPS, Instant::now());
        // Five readings, one a second, and no acknowledgement: two in flight, three wait.
        for _ in 0..5 {
            tokio::time::advance(Duration::from_secs(1)).await;
            assert!(c.tick(f.ctx(), &mut sink, Instant::now()).is_none());
        }
        let sent = sink.take();
        assert_eq!(telemetry_tags(&sent), vec![1, 2]);
        let Sent::Telemetry(_, props, body) = &sent[0] else { panic!("{sent:?}") };
        assert_eq!(props.get(crate::iot::sequence::PROPERTY), Some(crate::iot::sequence::stamp("run1", 1).as_str()));
        // The send-time stamp is wall time in milliseconds (the paused clock is tokio's only).
        let sent_ms = props.get(crate::iot::sequence::SENT_PROPERTY).and_then(crate::iot::sequence::parse_sent);
        let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
        assert!(sent_ms.is_some_and(|ms| (now_ms - 60_000..=now_ms).contains(&ms)), "{sent_ms:?}");
        assert_eq!(&body[..], br#"{"t":1}"#);
        assert_eq!(f.metrics.telemetry_generated.get(), 5);
        assert_eq!(f.metrics.telemetry_queued.get(), 5);
        // One acknowledgement frees one slot: the next reading goes out.
        c.inbound(f.ctx(), &mut sink, Inbound::Acked(1), Instant::now());
        assert_eq!(telemetry_tags(&sink.take()), vec![3]);
        assert_eq!(f.metrics.telemetry_acked.get(), 1);
        // A refusal for good also frees a slot, and is counted as dropped, not acknowledged.
        c.inbound(f.ctx(), &mut sink, Inbound::Rejected(2), Instant::now());
        assert_eq!(telemetry_tags(&sink.take()), vec![4]);
        assert_eq!(f.metrics.dropped("rejected_by_hub"), 1);
        assert_eq!(f.metrics.telemetry_acked.get(), 1);
        // An acknowledgement for a tag not in flight changes nothing.
        c.inbound(f.ctx(), &mut sink, Inbound::Acked(99), Instant::now());
        assert_eq!(sink.take(), vec![]);
        let m = &f.metrics;
        assert_eq!(
            m.telemetry_generated.get(),
            m.telemetry_acked.get() + m.dropped_count() + m.telemetry_queued.get() as u64
        );
    }

    #[tokio::test(start_paused = true)]
    async fn what_was_in_flight_when_the_connection_died_is_sent_again_with_its_stamp() {
        let f = Fixture::new(8);
        let mut c = core(behaviour("[devices.telemetry]\ninterval = \"1s\"\nfields = { t = 1 }\n"));
        let mut sink = Recorder::default();
        c.connected(f.ctx(), &mut sink, MQTT, Instant::now());
        for _ in 0..3 {
            tokio::time::advance(Duration::from_secs(1)).await;
            c.tick(f.ctx(), &mut sink, Instant::now());
        }
        let first: Vec<_> = sink.take().into_iter().filter(|s| matches!(s, Sent::Telemetry(..))).collect();
        assert_eq!(first.len(), 3);
        c.inbound(f.ctx(), &mut sink, Inbound::Acked(1), Instant::now());
        c.connection_closed();
        let mut again = Recorder { tag: 100, ..Recorder::default() };
        c.connected(f.ctx(), &mut again, MQTT, Instant::now());
        let resent: Vec<_> = again
            .take()
            .into_iter()
            .filter_map(|s| match s {
                Sent::Telemetry(_, p, _) => p.get(crate::iot::sequence::PROPERTY).map(str::to_owned),
                _ => None,
            })
            .collect();
        let stamp = |n| crate::iot::sequence::stamp("run1", n);
        assert_eq!(resent, vec![stamp(2), stamp(3)]);
        assert_eq!(f.metrics.telemetry_retransmits.get(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttled_report_is_retried_after_a_delay_without_what_a_newer_one_set() {
        let f = Fixture::new(4);
        let mut c = core(behaviour("[devices.reported]\na = 1\nb = 2\n"));
        let mut sink = Recorder::default();
        c.connected(f.ctx(), &mut sink, MQTT, Instant::now());
        assert_eq!(sink.take()[1], Sent::Report("r1".into(), json!({"a": 1, "b": 2})));
        // The hub throttles r1; before its retry is due, a newer patch sets `a`.
        c.inbound(f.ctx(), &mut sink, Inbound::Reported { rid: "r1".into(), status: 429 }, Instant::now());
        assert_eq!(sink.take(), vec![]);
        c.report(&mut sink, json!({"a": 3}));
        assert_eq!(sink.take(), vec![Sent::Report("r2".into(), json!({"a": 3}))]);
        let due = c.next_deadline().expect("a retry is scheduled");
        assert!(due >= Instant::now() + Duration::from_millis(100));
        tokio::time::advance(due - Instant::now()).await;
        c.tick(f.ctx(), &mut sink, Instant::now());
        assert_eq!(sink.take(), vec![Sent::Report("r3".into(), json!({"b": 2}))]);
        // Accepted: nothing more to retry.
        c.inbound(f.ctx(), &mut sink, Inbound::Reported { rid: "r3".into(), status: 204 }, Instant::now());
        assert_eq!(c.next_deadline(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn reports_a_lost_connection_left_unconfirmed_go_again_oldest_first() {
        let f = Fixture::new(4);
        let mut c = core(behaviour("[devices.reported]\na = 1\nb = 2\n"));
        let mut sink = Recorder::default();
        c.connected(f.ctx(), &mut sink, MQTT, Instant::now());
        c.report(&mut sink, json!({"b": 5}));
        sink.take();
        c.connection_closed();
        c.connected(f.ctx(), &mut sink, MQTT, Instant::now());
        // r1 without `b` (r2 set it since), then r2, then the start-up report of the new connection.
        assert_eq!(
            sink.take(),
            vec![
                Sent::TwinGet,
                Sent::Report("r1".into(), json!({"a": 1})),
                Sent::Report("r2".into(), json!({"b": 5})),
                Sent::Report("r3".into(), json!({"a": 1, "b": 2})),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_twin_get_is_asked_again_after_a_delay() {
        let f = Fixture::new(4);
        let mut c = core(behaviour(""));
        let mut sink = Recorder::default();
        c.connected(f.ctx(), &mut sink, MQTT, Instant::now());
        assert_eq!(sink.take(), vec![Sent::TwinGet]);
        c.inbound(f.ctx(), &mut sink, Inbound::Twin { status: 500, body: Bytes::new() }, Instant::now());
        let due = c.next_deadline().expect("a retry is scheduled");
        c.tick(f.ctx(), &mut sink, Instant::now());
        assert_eq!(sink.take(), vec![], "not before it is due");
        tokio::time::advance(due - Instant::now()).await;
        c.tick(f.ctx(), &mut sink, Instant::now());
        assert_eq!(sink.take(), vec![Sent::TwinGet]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reboot_command_ends_the_session_and_reports_once_back() {
        let f = Fixture::new(4);
        let b = behaviour(
            "[[devices.commands]]\nname = \"reboot\"\nreboot = { downtime = \"5s\", answer = \"before\", report = { rebooted = true } }\n",
        );
        let mut c = core(b);
        let mut sink = Recorder::default();
        c.connected(f.ctx(), &mut sink, MQTT, Instant::now());
        sink.take();
        let ev = Inbound::Method { name: "reboot".into(), rid: "7".into(), payload: Bytes::from_static(b"{}") };
        let end = c.inbound(f.ctx(), &mut sink, ev, Instant::now());
        let Some(End::Reboot { downtime, method, answer }) = end else { panic!("{end:?}") };
        assert_eq!((downtime, method.as_str(), answer.is_none()), (Duration::from_secs(5), "reboot", true));
        assert_eq!(sink.take(), vec![Sent::MethodResponse("7".into(), 200)]);
        c.connection_closed();
        c.rebooted(&method, answer);
        c.connected(f.ctx(), &mut sink, MQTT, Instant::now());
        assert_eq!(sink.take(), vec![Sent::TwinGet, Sent::Report("r1".into(), json!({"rebooted": true}))]);
    }

    #[tokio::test(start_paused = true)]
    async fn offline_readings_wait_in_the_outbox_and_quiesce_stops_them() {
        let f = Fixture::new(4);
        let mut c = core(behaviour("[devices.telemetry]\ninterval = \"1s\"\nfields = { t = 1 }\n"));
        tokio::time::advance(Duration::from_secs(1)).await;
        c.tick_offline(f.ctx(), Instant::now());
        assert_eq!(f.metrics.telemetry_generated.get(), 1);
        f.quiesce.store(true, Ordering::Relaxed);
        tokio::time::advance(Duration::from_secs(1)).await;
        c.tick_offline(f.ctx(), Instant::now());
        assert_eq!(f.metrics.telemetry_generated.get(), 1);
        let mut sink = Recorder::default();
        c.connected(f.ctx(), &mut sink, HTTPS, Instant::now());
        assert_eq!(telemetry_tags(&sink.take()), vec![1]);
        c.abandon(&f.metrics);
        assert_eq!(f.metrics.dropped("unacked_at_shutdown"), 1);
        assert_eq!(f.metrics.telemetry_queued.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn desired_patches_are_acknowledged_as_reported_patches() {
        let f = Fixture::new(4);
        let mut c = core(behaviour("[[devices.writable]]\nname = \"interval\"\ntype = \"number\"\n"));
        let mut sink = Recorder::default();
        c.connected(f.ctx(), &mut sink, MQTT, Instant::now());
        let twin = json!({"desired": {"$version": 1}, "reported": {"$version": 1}});
        c.inbound(f.ctx(), &mut sink, Inbound::Twin { status: 200, body: twin.to_string().into() }, Instant::now());
        sink.take();
        let patch = Bytes::from(json!({"interval": 5, "$version": 2}).to_string());
        c.inbound(f.ctx(), &mut sink, Inbound::Desired { version: Some(2), body: patch }, Instant::now());
        c.tick(f.ctx(), &mut sink, Instant::now());
        let sent = sink.take();
        assert_eq!(
            sent,
            vec![Sent::Report("r1".into(), json!({"interval": {"value": 5, "ac": 200, "av": 2, "ad": "completed"}}))]
        );
        assert_eq!(f.metrics.desired_patches.get(), 1);
    }
}
