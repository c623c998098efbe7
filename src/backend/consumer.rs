//! Reading an Event Hubs-compatible endpoint the way a back end does: `$management` names the
//! partitions, then one receiver link per partition on a consumer group, from a start position
//! given as a selector filter ("AMQP 1.0 in Azure Service Bus and Event Hubs protocol guide";
//! "Event Hubs AMQP": `apache.org:selector-filter:string` on `amqp.annotation.x-opt-offset`,
//! `x-opt-sequence-number` or `x-opt-enqueued-time`). Each event is decoded into `Event` with the
//! annotations IoT Hub sets ("Create and read IoT Hub messages": system properties). A lost
//! connection is opened again and each partition resumes after the last sequence number it
//! delivered; an Event Hub created anew meanwhile (its `created_at` moved: an emulator restarted
//! with an empty store) is read from its start.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail};
use fe2o3_amqp::link::Receiver;
use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::types::messaging::annotations::OwnedKey;
use fe2o3_amqp::types::messaging::{Body, Message, MessageId, Source};
use fe2o3_amqp::types::primitives::{SimpleValue, Symbol, Value};
use serde_amqp::described::Described;
use serde_amqp::descriptor::Descriptor;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::amqp::{Link, within};
use super::target::EventHubTarget;

/// Events a receiver may have in flight before it grants more credit (Event Hubs clients
/// default to a prefetch of 300; more keeps a fast reader fed across a round trip).
const PREFETCH: u32 = 1000;

/// How long a SAS token put on `$cbs` lasts; it is put again well before it expires.
const TOKEN_TTL: Duration = Duration::from_secs(3600);

/// Where each partition starts reading.
#[derive(Debug, Clone, PartialEq)]
pub enum StartAt {
    /// Only events enqueued after the receiver attached.
    Latest,
    /// The oldest event retained.
    Earliest,
    /// After this offset (`x-opt-offset`).
    Offset(String),
    /// Events enqueued at or after this time.
    Time(SystemTime),
}

impl StartAt {
    fn selector(&self) -> String {
        match self {
            StartAt::Latest => "amqp.annotation.x-opt-offset > '@latest'".into(),
            StartAt::Earliest => "amqp.annotation.x-opt-offset > '-1'".into(),
            StartAt::Offset(o) => format!("amqp.annotation.x-opt-offset > '{o}'"),
            StartAt::Time(t) => format!("amqp.annotation.x-opt-enqueued-time >= '{}'", unix_ms(*t)),
        }
    }
}

pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// One event as a back end sees it. Times are milliseconds since the Unix epoch.
#[derive(Debug, Clone, Default)]
pub struct Event {
    pub partition: Arc<str>,
    pub sequence_number: i64,
    pub offset: String,
    /// `x-opt-enqueued-time`: when the Event Hub took it.
    pub enqueued_ms: Option<i64>,
    /// `iothub-enqueuedtime`: when IoT Hub received it from the device.
    pub iothub_enqueued_ms: Option<i64>,
    pub device_id: Option<String>,
    pub module_id: Option<String>,
    /// `iothub-message-source`: `Telemetry`, `twinChangeEvents`, `deviceLifecycleEvents`, ...
    pub source: Option<String>,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    /// Application properties, as text, in the order received.
    pub properties: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// When this reader received it.
    pub arrived_ms: i64,
}

impl Event {
    pub fn property(&self, name: &str) -> Option<&str> {
        self.properties.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

fn simple_text(v: &SimpleValue) -> String {
    match v {
        SimpleValue::String(s) => s.clone(),
        SimpleValue::Symbol(s) => s.as_str().to_owned(),
        SimpleValue::Bool(b) => b.to_string(),
        SimpleValue::Int(n) => n.to_string(),
        SimpleValue::Long(n) => n.to_string(),
        SimpleValue::Uint(n) => n.to_string(),
        SimpleValue::Ulong(n) => n.to_string(),
        SimpleValue::Double(n) => n.to_string(),
        SimpleValue::Timestamp(t) => t.milliseconds().to_string(),
        other => format!("{other:?}"),
    }
}

fn id_text(id: &MessageId) -> String {
    match id {
        MessageId::String(s) => s.clone(),
        MessageId::Ulong(n) => n.to_string(),
        MessageId::Uuid(u) => uuid::Uuid::from_bytes(*u.as_inner()).to_string(),
        MessageId::Binary(b) => String::from_utf8_lossy(b).into_owned(),
    }
}

/// Decodes a received message; anything missing stays `None` rather than failing.
pub fn decode(partition: &Arc<str>, m: Message<Body<Value>>, arrived_ms: i64) -> Event {
    let ann = |name: &str| m.message_annotations.as_ref()?.0.get(&OwnedKey::Symbol(Symbol::from(name)));
    let text = |name: &str| match ann(name)? {
        Value::String(s) => Some(s.clone()),
        Value::Symbol(s) => Some(s.as_str().to_owned()),
        _ => None,
    };
    let time = |name: &str| match ann(name)? {
        Value::Timestamp(t) => Some(t.milliseconds()),
        Value::Long(n) => Some(*n),
        _ => None,
    };
    let sequence_number = match ann("x-opt-sequence-number") {
        Some(Value::Long(n)) => *n,
        Some(Value::Int(n)) => i64::from(*n),
        _ => -1,
    };
    let props = m.properties.as_ref();
    let body = match &m.body {
        Body::Data(batch) => batch.iter().flat_map(|d| d.0.iter().copied()).collect(),
        Body::Value(v) => match &v.0 {
            Value::Binary(b) => b.to_vec(),
            Value::String(s) => s.clone().into_bytes(),
            other => format!("{other:?}").into_bytes(),
        },
        _ => Vec::new(),
    };
    Event {
        partition: partition.clone(),
        sequence_number,
        offset: text("x-opt-offset").unwrap_or_default(),
        enqueued_ms: time("x-opt-enqueued-time"),
        iothub_enqueued_ms: time("iothub-enqueuedtime"),
        device_id: text("iothub-connection-device-id"),
        module_id: text("iothub-connection-module-id"),
        source: text("iothub-message-source"),
        message_id: props.and_then(|p| p.message_id.as_ref()).map(id_text),
        correlation_id: props.and_then(|p| p.correlation_id.as_ref()).map(id_text),
        content_type: props.and_then(|p| p.content_type.as_ref()).map(|s| s.as_str().to_owned()),
        content_encoding: props.and_then(|p| p.content_encoding.as_ref()).map(|s| s.as_str().to_owned()),
        properties: m
            .application_properties
            .as_ref()
            .map(|a| a.0.iter().map(|(k, v)| (k.clone(), simple_text(v))).collect())
            .unwrap_or_default(),
        body,
        arrived_ms,
    }
}

/// What to read and how to reach it.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub target: EventHubTarget,
    /// `host:port` to dial; normally the target's, an emulator's hub.json may name its address.
    pub dial: String,
    pub tls: Arc<rustls::ClientConfig>,
    pub group: String,
    pub start: StartAt,
    /// Only these partitions (all when empty).
    pub partitions: Vec<String>,
}

/// Why a consumer stopped for good.
pub type Stopped = anyhow::Result<()>;

fn expiry() -> u64 {
    crate::iot::time::unix_secs(SystemTime::now()) + TOKEN_TTL.as_secs()
}

async fn authorize(link: &mut Link, target: &EventHubTarget) -> anyhow::Result<()> {
    link.put_token(&target.audience(), target.token(expiry())).await
}

fn map_get<'v>(v: &'v Value, key: &str) -> Option<&'v Value> {
    match v {
        Value::Map(m) => m.get(&Value::String(key.to_owned())),
        _ => None,
    }
}

/// The Event Hub's partition ids and `created_at` (ms), from `$management` READ of
/// `com.microsoft:eventhub`.
pub async fn eventhub_info(link: &mut Link, target: &EventHubTarget) -> anyhow::Result<(Vec<String>, Option<i64>)> {
    let props = [("operation", "READ"), ("type", "com.microsoft:eventhub"), ("name", target.entity.as_str())];
    let (status, body) = link.request("$management", &props, Value::Null).await?;
    if !(200..300).contains(&status) {
        bail!("reading the event hub {} failed (status {status})", target.entity);
    }
    let created = match map_get(&body, "created_at") {
        Some(Value::Timestamp(t)) => Some(t.milliseconds()),
        _ => None,
    };
    let text = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        _ => None,
    };
    let ids: Vec<String> = match map_get(&body, "partition_ids") {
        Some(Value::Array(ids)) => ids.0.iter().filter_map(text).collect(),
        Some(Value::List(ids)) => ids.iter().filter_map(text).collect(),
        _ => bail!("the event hub's properties name no partition_ids"),
    };
    Ok((ids, created))
}

fn selector_source(address: String, expr: String) -> Source {
    // The filter's descriptor is `apache.org:selector-filter:string`, code 0x0000468C:0x00000004
    // in the Apache registry as Event Hubs uses it (0x0000_0137_0000_000A).
    let filter = Described { descriptor: Descriptor::Code(0x0000_0137_0000_000A), value: Value::String(expr) };
    Source::builder().address(address).add_to_filter("apache.org:selector-filter:string", filter).build()
}

/// Reads one partition until the link fails or `stop` fires; the last sequence number it
/// delivered is kept in `last` for a resumption.
async fn read_partition(
    mut receiver: Receiver,
    partition: Arc<str>,
    out: mpsc::Sender<Event>,
    last: Arc<std::sync::atomic::AtomicI64>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let d = tokio::select! {
            d = receiver.recv::<Body<Value>>() => d.map_err(|e| anyhow!("partition {partition}: {e}"))?,
            _ = stop.cancelled() => {
                let _ = receiver.close().await;
                return Ok(());
            }
        };
        let event = decode(&partition, d.into_message(), unix_ms(SystemTime::now()));
        last.store(event.sequence_number, std::sync::atomic::Ordering::Relaxed);
        if out.send(event).await.is_err() {
            let _ = receiver.close().await;
            return Ok(());
        }
    }
}

/// Reads every (selected) partition into `out` until `stop` fires or `out` is closed. The first
/// connection's failure (no such host, a refused token, an unknown consumer group) is returned;
/// later ones are retried with a backoff of up to 10 s, logged at WARN without secrets.
pub async fn run(cfg: ConsumerConfig, out: mpsc::Sender<Event>, stop: CancellationToken) -> Stopped {
    let mut resume = Resume::default();
    let mut attached = false;
    let mut backoff = Duration::from_millis(200);
    loop {
        let attempt = session(&cfg, &mut resume, &out, &stop, &mut attached).await;
        match attempt {
            Ok(()) => return Ok(()),
            Err(e) if !attached => return Err(e),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "the event hub reader lost its connection; reconnecting")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.cancelled() => return Ok(()),
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// What a reconnection resumes from: each partition's last delivered sequence number, and the
/// Event Hub's creation time they belong to.
#[derive(Default)]
struct Resume {
    partitions: Vec<(Arc<str>, Arc<std::sync::atomic::AtomicI64>)>,
    created: Option<i64>,
}

/// One connection's life: open, authorize, attach every partition (resuming where `resume`
/// says), read until a link fails or `stop`. `Ok` only when told to stop.
async fn session(
    cfg: &ConsumerConfig,
    resume: &mut Resume,
    out: &mpsc::Sender<Event>,
    stop: &CancellationToken,
    attached: &mut bool,
) -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicI64, Ordering};
    let mut link = Link::open(&cfg.dial, &cfg.target.host, cfg.tls.clone()).await?;
    let result = async {
        authorize(&mut link, &cfg.target).await?;
        let (mut ids, created) = eventhub_info(&mut link, &cfg.target).await?;
        // Sequence numbers belong to one Event Hub: one created anew is read from its start.
        let renewed = *attached && created.is_some() && resume.created.is_some() && created != resume.created;
        if renewed {
            tracing::warn!(hub = %cfg.target.entity, "the event hub was created anew: reading it from its start");
        }
        resume.created = created;
        if resume.partitions.is_empty() || renewed {
            if !cfg.partitions.is_empty() {
                if let Some(p) = cfg.partitions.iter().find(|p| !ids.contains(p)) {
                    bail!("the event hub has no partition {p} (it has {})", ids.join(", "));
                }
                ids.retain(|p| cfg.partitions.contains(p));
            }
            resume.partitions =
                ids.into_iter().map(|p| (Arc::from(p.as_str()), Arc::new(AtomicI64::new(-1)))).collect();
        }
        let mut tasks = tokio::task::JoinSet::new();
        let links_stop = stop.child_token();
        for (p, last) in resume.partitions.iter() {
            let seen = last.load(Ordering::Relaxed);
            let expr = if renewed {
                StartAt::Earliest.selector()
            } else if !*attached || seen < 0 {
                cfg.start.selector()
            } else {
                format!("amqp.annotation.x-opt-sequence-number > '{seen}'")
            };
            let source = selector_source(cfg.target.partition_address(&cfg.group, p), expr);
            let receiver = Receiver::builder()
                .name(format!("fleetsim-{p}-{}", uuid::Uuid::new_v4()))
                .source(source)
                .target(format!("fleetsim-reader-{p}"))
                .credit_mode(CreditMode::Auto(PREFETCH))
                .auto_accept(true)
                .attach(&mut link.session);
            let receiver = within(&format!("attaching partition {p} of group {}", cfg.group), receiver).await?;
            tasks.spawn(read_partition(receiver, p.clone(), out.clone(), last.clone(), links_stop.clone()));
        }
        *attached = true;
        let mut refresh = tokio::time::interval_at(tokio::time::Instant::now() + TOKEN_TTL / 2, TOKEN_TTL / 2);
        let outcome = loop {
            tokio::select! {
                r = tasks.join_next() => match r {
                    None => break Ok(()),
                    Some(Ok(Ok(()))) => {
                        if stop.is_cancelled() || out.is_closed() {
                            continue;
                        }
                        break Err(anyhow!("a partition reader ended"));
                    }
                    Some(Ok(Err(e))) => break Err(e),
                    Some(Err(e)) => break Err(anyhow!("a partition reader failed: {e}")),
                },
                _ = refresh.tick() => {
                    if let Err(e) = authorize(&mut link, &cfg.target).await {
                        break Err(e);
                    }
                }
            }
        };
        links_stop.cancel();
        while tasks.join_next().await.is_some() {}
        outcome
    }
    .await;
    link.close().await;
    result
}
