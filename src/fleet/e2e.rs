//! The CI end-to-end check: while the fleet runs, read the hub's Event Hubs-compatible endpoint
//! as a back end would (`backend::consumer`, any hub: Azure or an emulator) and keep the books of
//! this run's messages there: per identity, the `fleetsim-seq` stamps through the emulator's own
//! tracker (`hub::sequence::Tracker`: unique, duplicates, gaps), and the latency from each
//! message's `fleetsim-sent` stamp to `iothub-enqueuedtime` and to arrival at the reader
//! (Prometheus histograms, and exact-max histograms for the report). Events of other runs or
//! without stamps are counted and otherwise ignored.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::report::{Histogram, method_bounds_ms, percentiles};
use crate::backend::consumer::{self, ConsumerConfig, Event, StartAt};
use crate::backend::target::EventHubTarget;
use crate::config::ci::EndToEnd;
use crate::hub::info::HubInfo;
use crate::hub::sequence::{Arrival, Tracker};
use crate::iot::sequence;
use crate::metrics::FleetMetrics;

/// How far before the run's start the reader begins, so a clock step or a first message sent
/// while the reader attaches is not missed (older runs' events are told apart by run id).
const LOOK_BACK: Duration = Duration::from_secs(10);

/// Where the check reads, or why it cannot: `Ok(None)` when it is off. Unless `enabled` says
/// otherwise it is on with a connection string, and with the embedded emulator (this run owns
/// it and its endpoint, so the check costs nothing anyone else sees); an external emulator's
/// endpoint may be shared with earlier runs' readers, so there it is on when asked for.
pub fn endpoint(
    cfg: &EndToEnd,
    hub_info: Option<&HubInfo>,
    embedded: bool,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Option<ConsumerConfig>, String> {
    let default_on = cfg.connection_string.is_some() || embedded;
    if !cfg.enabled.unwrap_or(default_on) {
        return Ok(None);
    }
    let (text, dial) = match (&cfg.connection_string, hub_info) {
        (Some(cs), _) => (cs.value.clone(), None),
        (None, Some(info)) => match &info.eventhub_connection_string {
            Some(cs) => (cs.clone(), info.amqp_addr.map(|a| a.to_string())),
            None if cfg.enabled == Some(true) => return Err("the emulator serves no Event Hubs endpoint".into()),
            None => return Ok(None),
        },
        (None, None) if cfg.enabled == Some(true) => {
            return Err("[ci.end_to_end] needs connection_string against Azure".into());
        }
        (None, None) => return Ok(None),
    };
    let target: EventHubTarget = text.parse().map_err(|e| format!("the Event Hubs connection string: {e}"))?;
    let dial = dial.unwrap_or_else(|| format!("{}:{}", target.host, target.port));
    let start = StartAt::Time(SystemTime::now().checked_sub(LOOK_BACK).unwrap_or(SystemTime::UNIX_EPOCH));
    Ok(Some(ConsumerConfig { target, dial, tls, group: cfg.consumer_group.clone(), start, partitions: Vec::new() }))
}

/// The books of one run at the back end.
struct Books {
    run: Arc<str>,
    trackers: HashMap<(String, Option<String>), Tracker>,
    unique: u64,
    duplicates: u64,
    /// Events read of other runs, or without a stamp (other senders, twin or lifecycle events).
    other: u64,
    /// This run's events without a usable `fleetsim-sent` stamp: counted, not timed.
    untimed: u64,
    enqueued_ms: Histogram,
    read_ms: Histogram,
}

impl Books {
    fn record(&mut self, e: &Event, m: &FleetMetrics) {
        let Some((run, n)) = e.property(sequence::PROPERTY).and_then(sequence::parse) else {
            self.other += 1;
            return;
        };
        if run != &*self.run {
            self.other += 1;
            return;
        }
        let key = (e.device_id.clone().unwrap_or_default(), e.module_id.clone());
        let tracker = self.trackers.entry(key).or_insert_with(|| Tracker::new(run));
        if tracker.record(n) == Arrival::Duplicate {
            self.duplicates += 1;
            m.e2e_event("duplicate");
            return;
        }
        self.unique += 1;
        m.e2e_event("unique");
        let Some(sent) = e.property(sequence::SENT_PROPERTY).and_then(sequence::parse_sent) else {
            self.untimed += 1;
            return;
        };
        // Clocks of different machines may disagree by a little: a negative latency is zero.
        let ms = |at: i64| (at - sent).max(0) as f64;
        if let Some(at) = e.iothub_enqueued_ms.or(e.enqueued_ms) {
            self.enqueued_ms.observe(ms(at));
            m.e2e_enqueued_seconds.observe(ms(at) / 1e3);
        }
        self.read_ms.observe(ms(e.arrived_ms));
        m.e2e_read_seconds.observe(ms(e.arrived_ms) / 1e3);
    }
}

/// A running reader and its books.
pub struct Reader {
    books: Arc<Mutex<Books>>,
    stop: CancellationToken,
    consumer: JoinHandle<consumer::Stopped>,
    tally: JoinHandle<()>,
    group: String,
}

/// What the reader found, for the report.
#[derive(Debug, Clone)]
pub struct Summary {
    pub unique: u64,
    pub duplicates: u64,
    pub gaps: u64,
    pub identities: u64,
    pub other_events: u64,
    pub untimed: u64,
    pub enqueued_ms: Histogram,
    pub read_ms: Histogram,
    pub consumer_group: String,
    /// Why the reader stopped early, if it did (a refused token, an unknown consumer group).
    pub error: Option<String>,
}

impl Reader {
    pub fn start(cfg: ConsumerConfig, run: Arc<str>, metrics: Arc<FleetMetrics>) -> Reader {
        let books = Arc::new(Mutex::new(Books {
            run,
            trackers: HashMap::new(),
            unique: 0,
            duplicates: 0,
            other: 0,
            untimed: 0,
            enqueued_ms: Histogram::new(method_bounds_ms()),
            read_ms: Histogram::new(method_bounds_ms()),
        }));
        let (tx, mut rx) = mpsc::channel::<Event>(4096);
        let stop = CancellationToken::new();
        let group = cfg.group.clone();
        let consumer = tokio::spawn(consumer::run(cfg, tx, stop.clone()));
        let tally_books = books.clone();
        let tally = tokio::spawn(async move {
            while let Some(e) = rx.recv().await {
                // Take what else is queued under one lock.
                let mut b = tally_books.lock().unwrap_or_else(|p| p.into_inner());
                b.record(&e, &metrics);
                while let Ok(e) = rx.try_recv() {
                    b.record(&e, &metrics);
                }
            }
        });
        Reader { books, stop, consumer, tally, group }
    }

    /// This run's unique messages read so far.
    pub fn unique(&self) -> u64 {
        self.books.lock().unwrap_or_else(|p| p.into_inner()).unique
    }

    /// False once the reader gave up (its first connection failed).
    pub fn running(&self) -> bool {
        !self.consumer.is_finished()
    }

    /// Stops reading and closes the books.
    pub async fn finish(self) -> Summary {
        self.stop.cancel();
        let error = match self.consumer.await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(e) => Some(format!("the reader failed: {e}")),
        };
        let _ = self.tally.await;
        let b = self.books.lock().unwrap_or_else(|p| p.into_inner());
        Summary {
            unique: b.unique,
            duplicates: b.duplicates,
            gaps: b.trackers.values().map(Tracker::gaps).sum(),
            identities: b.trackers.len() as u64,
            other_events: b.other,
            untimed: b.untimed,
            enqueued_ms: b.enqueued_ms.clone(),
            read_ms: b.read_ms.clone(),
            consumer_group: self.group,
            error,
        }
    }
}

impl Summary {
    /// The report's `end_to_end` section (without the loss split, which `ci.rs` adds).
    pub fn to_json(&self) -> Value {
        json!({
            "consumer_group": self.consumer_group,
            "unique": self.unique,
            "duplicates": self.duplicates,
            "gaps": self.gaps,
            "identities": self.identities,
            "other_events": self.other_events,
            "untimed": self.untimed,
            "error": self.error,
            "latency_ms": {
                "enqueued": percentiles(&self.enqueued_ms),
                "read": percentiles(&self.read_ms),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(device: &str, seq: &str, sent: Option<i64>, enqueued: i64, arrived: i64) -> Event {
        let mut properties = vec![(sequence::PROPERTY.to_owned(), seq.to_owned())];
        if let Some(s) = sent {
            properties.push((sequence::SENT_PROPERTY.to_owned(), s.to_string()));
        }
        Event {
            partition: "0".into(),
            device_id: Some(device.into()),
            properties,
            iothub_enqueued_ms: Some(enqueued),
            arrived_ms: arrived,
            ..Default::default()
        }
    }

    #[test]
    fn the_books_count_this_runs_stamps_and_time_each_message_once() {
        let m = FleetMetrics::default();
        let mut b = Books {
            run: "r1".into(),
            trackers: HashMap::new(),
            unique: 0,
            duplicates: 0,
            other: 0,
            untimed: 0,
            enqueued_ms: Histogram::new(method_bounds_ms()),
            read_ms: Histogram::new(method_bounds_ms()),
        };
        b.record(&event("d1", "r1:1", Some(1000), 1010, 1100), &m);
        b.record(&event("d1", "r1:1", Some(1000), 1010, 1900), &m); // redelivered
        b.record(&event("d1", "r1:3", Some(2000), 2050, 2300), &m); // 2 is a gap
        b.record(&event("d2", "r1:1", None, 5, 5), &m); // no send stamp: counted, not timed
        b.record(&event("d1", "r0:9", Some(1), 2, 3), &m); // another run
        b.record(&Event { partition: "0".into(), ..Default::default() }, &m); // not ours at all
        assert_eq!((b.unique, b.duplicates, b.other, b.untimed), (3, 1, 2, 1));
        assert_eq!(b.trackers.values().map(Tracker::gaps).sum::<u64>(), 1);
        assert_eq!(b.enqueued_ms.count(), 2);
        assert_eq!((b.enqueued_ms.max, b.read_ms.max), (50.0, 300.0));
        assert_eq!(m.e2e_read_seconds.get_sample_count(), 2);
        // A device clock ahead of the hub's reads as zero latency, never negative.
        b.record(&event("d3", "r1:1", Some(5000), 4990, 4995), &m);
        assert_eq!(b.read_ms.counts[0], 1);
    }

    #[test]
    fn the_check_is_on_where_the_endpoint_is_known() {
        let tls = crate::client::transport::client_config(None).unwrap();
        let cfg = EndToEnd::default();
        assert!(endpoint(&cfg, None, false, tls.clone()).unwrap().is_none(), "Azure without a connection string: off");
        let on = EndToEnd { enabled: Some(true), ..EndToEnd::default() };
        assert!(endpoint(&on, None, false, tls.clone()).is_err(), "asked for, impossible: an error");
    }
}
