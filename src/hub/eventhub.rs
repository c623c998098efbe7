//! The built-in Event Hubs-compatible endpoint's store: every accepted device-to-cloud message,
//! whatever transport carried it, appended to one of the endpoint's partitions (a stable hash of
//! the device id) with the sequence number, offset and enqueued time Event Hubs readers see, kept
//! within a bound of events, of bytes and of time ("Read device-to-cloud messages from the
//! built-in endpoint"). No I/O: the AMQP front end reads it (`amqp/`), `devices.rs` and
//! `events.rs` feed it, and the journal hook tells the store (`store/`) which partition grew, so
//! the store can keep what is retained across a restart.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::telemetry::StoredMessage;

/// One event in a partition, as Event Hubs numbers it.
#[derive(Debug, Clone)]
pub struct Event {
    /// `x-opt-sequence-number`: from 0, per partition, without gaps.
    pub sequence_number: i64,
    /// `x-opt-offset`: increasing per partition (the byte position of the event's body in the
    /// partition's stream, as Event Hubs offsets are), sent as a decimal string.
    pub offset: i64,
    /// `x-opt-enqueued-time`.
    pub enqueued: SystemTime,
    pub message: Arc<StoredMessage>,
}

/// Where a reader starts, from the `apache.org:selector-filter:string` of its link's source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// No filter, or `x-opt-offset > '-1'`: the oldest retained event.
    Start,
    /// `x-opt-offset > '@latest'`: only events enqueued after the link attached.
    Latest,
    /// `x-opt-offset > 'N'` (`>=` when inclusive).
    Offset { value: i64, inclusive: bool },
    /// `x-opt-sequence-number > 'N'` (`>=` when inclusive).
    Sequence { value: i64, inclusive: bool },
    /// `x-opt-enqueued-time > 'MS'` (milliseconds since the Unix epoch; `>=` when inclusive).
    Enqueued { ms: i64, inclusive: bool },
}

/// A start position past the end of a partition: Event Hubs detaches such a receiver with
/// `com.microsoft:argument-error` and this text ("The supplied sequence number '488' is invalid.
/// The last sequence number in the system is '482'", as its brokers word it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("The supplied {what} '{supplied}' is invalid. The last {what} in the system is '{last}'")]
pub struct BeyondEnd {
    pub what: &'static str,
    pub supplied: i64,
    pub last: i64,
}

/// How much a partition keeps: at most `events` events, `bytes` bytes (bodies and property names
/// and values) and events no older than `age`; the oldest go first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub events: usize,
    pub bytes: u64,
    pub age: Duration,
}

/// What an event counts against the byte bound: its body and its properties' names and values.
fn event_size(m: &StoredMessage) -> u64 {
    let props: usize = m.system.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
        + m.application.iter().map(|(k, v)| k.len() + v.as_ref().map_or(0, String::len)).sum::<usize>();
    (m.body.len() + props) as u64
}

/// A selector the endpoint does not understand; the AMQP front end refuses the link with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported filter expression `{0}`")]
pub struct BadFilter(pub String);

impl Position {
    /// Parses the selector the Event Hubs clients send: `amqp.annotation.x-opt-offset > '12'`,
    /// `amqp.annotation.x-opt-sequence-number >= '5'`, `amqp.annotation.x-opt-enqueued-time >
    /// '1700000000000'`, with `'-1'` (start) and `'@latest'` for offsets (the Event Hubs AMQP
    /// filter grammar the SDKs share; the value is quoted, whitespace around the operator free).
    pub fn parse(selector: &str) -> Result<Position, BadFilter> {
        let bad = || BadFilter(selector.chars().take(200).collect());
        let s = selector.trim();
        let rest = s.strip_prefix("amqp.annotation.").ok_or_else(bad)?;
        let (field, rest) = rest.split_once(|c: char| c.is_whitespace() || c == '>').ok_or_else(bad)?;
        let rest = rest.trim_start();
        let rest = rest.strip_prefix('>').unwrap_or(rest);
        let (inclusive, rest) = match rest.strip_prefix('=') {
            Some(r) => (true, r),
            None => (false, rest),
        };
        let value = rest.trim().strip_prefix('\'').and_then(|v| v.strip_suffix('\'')).ok_or_else(bad)?;
        let number = || value.parse::<i64>().map_err(|_| bad());
        match field {
            "x-opt-offset" if value == "@latest" => Ok(Position::Latest),
            "x-opt-offset" => match number()? {
                -1 => Ok(Position::Start),
                v if v < -1 => Err(bad()),
                v => Ok(Position::Offset { value: v, inclusive }),
            },
            "x-opt-sequence-number" => Ok(Position::Sequence { value: number()?, inclusive }),
            "x-opt-enqueued-time" => Ok(Position::Enqueued { ms: number()?, inclusive }),
            _ => Err(bad()),
        }
    }

    fn admits(&self, e: &Event) -> bool {
        let cmp = |have: i64, want: i64, inclusive: bool| if inclusive { have >= want } else { have > want };
        match *self {
            Position::Start | Position::Latest => true,
            Position::Offset { value, inclusive } => cmp(e.offset, value, inclusive),
            Position::Sequence { value, inclusive } => cmp(e.sequence_number, value, inclusive),
            Position::Enqueued { ms, inclusive } => cmp(unix_ms(e.enqueued), ms, inclusive),
        }
    }
}

/// Milliseconds since the Unix epoch (AMQP timestamps), 0 before it.
pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)).unwrap_or(0)
}

/// What `$management` reads of a partition (`com.microsoft:partition`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionInfo {
    /// The oldest retained sequence number; the next one to be written when empty.
    pub begin_sequence_number: i64,
    /// -1 before the first event.
    pub last_enqueued_sequence_number: i64,
    /// "-1" before the first event.
    pub last_enqueued_offset: i64,
    pub last_enqueued_time: Option<SystemTime>,
    pub is_empty: bool,
}

#[derive(Debug, Default)]
struct Log {
    events: VecDeque<Event>,
    /// What the retained events count against `Retention::bytes`.
    bytes: u64,
    next_sequence: i64,
    next_offset: i64,
    last: Option<(i64, i64, SystemTime)>,
}

impl Log {
    fn evict(&mut self, keep: &Retention, now: SystemTime) {
        let oldest = now.checked_sub(keep.age);
        while self.events.len() > keep.events
            || self.bytes > keep.bytes
            || self.events.front().is_some_and(|e| oldest.is_some_and(|o| e.enqueued < o))
        {
            let Some(e) = self.events.pop_front() else { break };
            self.bytes = self.bytes.saturating_sub(event_size(&e.message));
        }
    }
}

/// Where a partition's numbering stands, kept by the store even when no event is retained, so a
/// restarted hub goes on numbering where it stopped (readers' checkpoints stay valid).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Numbering {
    pub next_sequence: i64,
    pub next_offset: i64,
    /// The last event's sequence number, offset and enqueued time.
    pub last: Option<(i64, i64, SystemTime)>,
}

impl Numbering {
    /// The numbering right after `e` was appended: the offset advances by the body's length (at
    /// least 1, so offsets stay distinct for empty bodies).
    pub fn after(e: &Event) -> Numbering {
        let len = i64::try_from(e.message.body.len()).unwrap_or(i64::MAX);
        Numbering {
            next_sequence: e.sequence_number + 1,
            next_offset: e.offset.saturating_add(len.max(1)),
            last: Some((e.sequence_number, e.offset, e.enqueued)),
        }
    }
}

/// Called with a partition's index after an event is appended to it (the store's journal).
pub type Journal = Box<dyn Fn(usize) + Send + Sync>;

/// One partition: its log and a signal readers wait on (the next sequence number to be written).
#[derive(Debug)]
pub struct Partition {
    log: Mutex<Log>,
    written: watch::Sender<i64>,
}

/// The endpoint: its name (the hub's name, as Azure names the compatible Event Hub), creation
/// time and partitions.
pub struct EventHub {
    pub name: String,
    pub created: SystemTime,
    partitions: Vec<Partition>,
    retention: Retention,
    journal: OnceLock<Journal>,
}

impl std::fmt::Debug for EventHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventHub").field("name", &self.name).field("partitions", &self.partitions.len()).finish()
    }
}

impl EventHub {
    /// An endpoint named `name` with `partitions` partitions (at least one), each retaining what
    /// `retention` allows.
    pub fn new(name: String, partitions: u32, retention: Retention, now: SystemTime) -> Self {
        let partitions = (0..partitions.max(1))
            .map(|_| Partition { log: Mutex::new(Log::default()), written: watch::Sender::new(0) })
            .collect();
        EventHub { name, created: now, partitions, retention, journal: OnceLock::new() }
    }

    /// Sets the hook told of every append (once; a second call is ignored).
    pub fn set_journal(&self, journal: Journal) {
        let _ = self.journal.set(journal);
    }

    /// Puts back what a store kept of partition `partition`: its numbering and its retained
    /// events, oldest first (those past retention at `now` are dropped). Before any append.
    pub fn restore(&self, partition: usize, numbering: Numbering, events: Vec<Event>, now: SystemTime) {
        let Some(p) = self.partitions.get(partition) else { return };
        let mut log = p.log.lock().unwrap_or_else(|e| e.into_inner());
        log.bytes = events.iter().map(|e| event_size(&e.message)).sum();
        log.events = events.into();
        log.next_sequence = numbering.next_sequence;
        log.next_offset = numbering.next_offset;
        log.last = numbering.last;
        log.evict(&self.retention, now);
        let next = log.next_sequence;
        drop(log);
        p.written.send_replace(next);
    }

    /// A partition's numbering, and the first sequence number it still retains (everything below
    /// it may be forgotten).
    pub fn numbering(&self, partition: usize) -> (Numbering, i64) {
        let log = self.partitions[partition].log.lock().unwrap_or_else(|e| e.into_inner());
        let begin = log.events.front().map_or(log.next_sequence, |e| e.sequence_number);
        (Numbering { next_sequence: log.next_sequence, next_offset: log.next_offset, last: log.last }, begin)
    }

    pub fn partition_count(&self) -> usize {
        self.partitions.len()
    }

    /// Whether anything is stored at all (`eventhub_retention_events` > 0).
    pub fn enabled(&self) -> bool {
        self.retention.events > 0
    }

    /// The partition a device's messages go to: FNV-1a of the device id, modulo the count, so
    /// that one device's events stay in order in one partition across restarts.
    pub fn partition_for(&self, device_id: &str) -> usize {
        let mut h: u32 = 0x811c_9dc5;
        for b in device_id.bytes() {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
        (h as usize) % self.partitions.len()
    }

    /// Parses a partition id as the endpoint names them ("0" to "count-1").
    pub fn partition(&self, id: &str) -> Option<usize> {
        let n: usize = id.parse().ok()?;
        (n < self.partitions.len() && n.to_string() == id).then_some(n)
    }

    /// Appends a message from `device_id`, stamped `now`, and wakes the partition's readers.
    pub fn append(&self, device_id: &str, message: Arc<StoredMessage>, now: SystemTime) {
        if !self.enabled() {
            return;
        }
        let index = self.partition_for(device_id);
        let p = &self.partitions[index];
        let next = {
            let mut log = p.log.lock().unwrap_or_else(|e| e.into_inner());
            let event = Event { sequence_number: log.next_sequence, offset: log.next_offset, enqueued: now, message };
            let n = Numbering::after(&event);
            (log.next_sequence, log.next_offset, log.last) = (n.next_sequence, n.next_offset, n.last);
            log.bytes = log.bytes.saturating_add(event_size(&event.message));
            log.events.push_back(event);
            log.evict(&self.retention, now);
            log.next_sequence
        };
        if let Some(journal) = self.journal.get() {
            journal(index);
        }
        p.written.send_replace(next);
    }

    /// The first sequence number a reader starting at `from` may receive: for `Latest`, the next
    /// one to be written; otherwise the first retained event `from` admits (or the next to be
    /// written when none is retained yet). A position older than what is retained starts at the
    /// oldest retained event, as Event Hubs does; a sequence number or offset past the end of the
    /// partition is refused (`BeyondEnd`).
    pub fn start(&self, partition: usize, from: Position, now: SystemTime) -> Result<i64, BeyondEnd> {
        let mut log = self.partitions[partition].log.lock().unwrap_or_else(|e| e.into_inner());
        log.evict(&self.retention, now);
        let (last_sequence, last_offset) = log.last.map_or((-1, -1), |(s, o, _)| (s, o));
        match from {
            Position::Latest => return Ok(log.next_sequence),
            Position::Sequence { value, inclusive } if value > last_sequence + i64::from(inclusive) => {
                return Err(BeyondEnd { what: "sequence number", supplied: value, last: last_sequence });
            }
            Position::Offset { value, .. } if value > last_offset => {
                return Err(BeyondEnd { what: "offset", supplied: value, last: last_offset });
            }
            _ => {}
        }
        Ok(log.events.iter().find(|e| from.admits(e)).map_or(log.next_sequence, |e| e.sequence_number))
    }

    /// Up to `max` retained events of a partition from sequence number `next` on (past retention,
    /// from the oldest retained one), oldest first.
    pub fn read(&self, partition: usize, next: i64, max: usize, now: SystemTime) -> Vec<Event> {
        let mut log = self.partitions[partition].log.lock().unwrap_or_else(|e| e.into_inner());
        log.evict(&self.retention, now);
        let first = log.events.front().map_or(log.next_sequence, |e| e.sequence_number);
        let skip = usize::try_from(next.saturating_sub(first)).unwrap_or(0);
        log.events.iter().skip(skip).take(max).cloned().collect()
    }

    /// A receiver that changes whenever the partition is written.
    pub fn watch(&self, partition: usize) -> watch::Receiver<i64> {
        self.partitions[partition].written.subscribe()
    }

    /// What `$management` reports of a partition.
    pub fn info(&self, partition: usize, now: SystemTime) -> PartitionInfo {
        let mut log = self.partitions[partition].log.lock().unwrap_or_else(|e| e.into_inner());
        log.evict(&self.retention, now);
        let begin = log.events.front().map_or(log.next_sequence, |e| e.sequence_number);
        let (last_seq, last_offset, last_time) = match log.last {
            Some((s, o, t)) => (s, o, Some(t)),
            None => (-1, -1, None),
        };
        PartitionInfo {
            begin_sequence_number: begin,
            last_enqueued_sequence_number: last_seq,
            last_enqueued_offset: last_offset,
            last_enqueued_time: last_time,
            is_empty: log.events.is_empty(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(body: &'static [u8]) -> Arc<StoredMessage> {
        Arc::new(StoredMessage {
            source: crate::hub::telemetry::Source::Telemetry,
            enqueued: SystemTime::UNIX_EPOCH,
            system: Vec::new(),
            application: Vec::new(),
            body: bytes::Bytes::from_static(body),
        })
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    #[test]
    fn parses_the_selectors_the_sdks_send() {
        assert_eq!(Position::parse("amqp.annotation.x-opt-offset > '-1'"), Ok(Position::Start));
        assert_eq!(Position::parse("amqp.annotation.x-opt-offset > '@latest'"), Ok(Position::Latest));
        assert_eq!(
            Position::parse("amqp.annotation.x-opt-offset >= '120'"),
            Ok(Position::Offset { value: 120, inclusive: true })
        );
        assert_eq!(
            Position::parse("amqp.annotation.x-opt-sequence-number>'7'"),
            Ok(Position::Sequence { value: 7, inclusive: false })
        );
        assert_eq!(
            Position::parse("amqp.annotation.x-opt-enqueued-time > '1700000000000'"),
            Ok(Position::Enqueued { ms: 1_700_000_000_000, inclusive: false })
        );
        for bad in [
            "",
            "amqp.annotation.x-opt-offset",
            "amqp.annotation.x-opt-offset > 12",
            "amqp.annotation.x-opt-offset > '-2'",
            "amqp.annotation.x-opt-offset > 'abc'",
            "amqp.annotation.x-opt-partition-key > '1'",
            "sys.x > '1'",
        ] {
            assert!(Position::parse(bad).is_err(), "{bad}");
        }
    }

    fn keep(events: usize, bytes: u64, secs: u64) -> Retention {
        Retention { events, bytes, age: Duration::from_secs(secs) }
    }

    #[test]
    fn numbers_events_per_partition_and_bounds_them_by_count_and_age() {
        let eh = EventHub::new("hub".into(), 4, keep(3, u64::MAX, 60), at(0));
        let p = eh.partition_for("d1");
        assert_eq!(p, eh.partition_for("d1"), "stable");
        for (i, body) in [&b"a"[..], b"bb", b"ccc", b"dddd"].into_iter().enumerate() {
            eh.append("d1", message(body), at(i as u64));
        }
        let all = eh.read(p, 0, 10, at(4));
        assert_eq!(all.iter().map(|e| e.sequence_number).collect::<Vec<_>>(), [1, 2, 3], "count-bounded");
        assert_eq!(all.iter().map(|e| e.offset).collect::<Vec<_>>(), [1, 3, 6], "offsets advance by body size");
        let info = eh.info(p, at(4));
        assert_eq!((info.begin_sequence_number, info.last_enqueued_sequence_number, info.is_empty), (1, 3, false));
        assert_eq!(info.last_enqueued_offset, 6);
        assert_eq!(eh.start(p, Position::Offset { value: 3, inclusive: false }, at(4)), Ok(3));
        assert_eq!(eh.start(p, Position::Offset { value: 3, inclusive: true }, at(4)), Ok(2));
        assert_eq!(eh.start(p, Position::Sequence { value: 1, inclusive: false }, at(4)), Ok(2));
        let ms = unix_ms(at(2));
        assert_eq!(eh.start(p, Position::Enqueued { ms, inclusive: true }, at(4)), Ok(2));
        assert_eq!(eh.start(p, Position::Latest, at(4)), Ok(4));
        assert_eq!(eh.start(p, Position::Start, at(4)), Ok(1));
        assert_eq!(
            eh.start(p, Position::Sequence { value: 0, inclusive: true }, at(4)),
            Ok(1),
            "older: the oldest kept"
        );
        assert_eq!(eh.start(p, Position::Sequence { value: 3, inclusive: false }, at(4)), Ok(4), "just the new ones");
        assert_eq!(eh.start(p, Position::Sequence { value: 4, inclusive: true }, at(4)), Ok(4));
        let beyond = eh.start(p, Position::Sequence { value: 4, inclusive: false }, at(4)).unwrap_err();
        assert_eq!(
            beyond.to_string(),
            "The supplied sequence number '4' is invalid. The last sequence number in the system is '3'"
        );
        assert_eq!(eh.start(p, Position::Offset { value: 6, inclusive: false }, at(4)), Ok(4));
        assert!(eh.start(p, Position::Offset { value: 7, inclusive: true }, at(4)).is_err());
        assert_eq!(eh.read(p, 3, 10, at(4)).len(), 1);
        // Age: all four are older than 60 s at t=64.
        assert!(eh.read(p, 0, 10, at(64)).is_empty());
        let info = eh.info(p, at(64));
        assert_eq!((info.begin_sequence_number, info.last_enqueued_sequence_number, info.is_empty), (4, 3, true));
        let other = (p + 1) % 4;
        assert_eq!(eh.info(other, at(0)).last_enqueued_sequence_number, -1);
    }

    #[test]
    fn partition_ids_are_the_canonical_numbers() {
        let eh = EventHub::new("hub".into(), 4, keep(1, u64::MAX, 1), at(0));
        assert_eq!(eh.partition("3"), Some(3));
        for bad in ["4", "-1", "01", "", "x"] {
            assert_eq!(eh.partition(bad), None, "{bad}");
        }
        let spread: std::collections::HashSet<usize> = (0..64).map(|i| eh.partition_for(&format!("dev-{i}"))).collect();
        assert_eq!(spread.len(), 4, "devices spread over every partition");
    }

    #[test]
    fn the_byte_bound_drops_the_oldest() {
        let eh = EventHub::new("hub".into(), 1, keep(100, 10, 60), at(0));
        for body in [&b"aaaa"[..], b"bbbb", b"cccc"] {
            eh.append("d", message(body), at(0));
        }
        let kept = eh.read(0, 0, 10, at(0));
        assert_eq!(kept.iter().map(|e| e.sequence_number).collect::<Vec<_>>(), [1, 2], "12 bytes > 10: one dropped");
        assert_eq!(eh.info(0, at(0)).begin_sequence_number, 1);
        eh.append("d", message(b"0123456789ab"), at(0));
        assert!(eh.read(0, 0, 10, at(0)).is_empty(), "an event larger than the bound is not kept either");
    }

    #[test]
    fn nothing_is_stored_when_retention_is_zero() {
        let eh = EventHub::new("hub".into(), 2, keep(0, u64::MAX, 1), at(0));
        eh.append("d", message(b"x"), at(0));
        assert!(!eh.enabled());
        assert!(eh.info(eh.partition_for("d"), at(0)).is_empty);
    }
}
