//! The emulator's durable store: everything IoT Hub and DPS keep (identities with their keys,
//! twins and C2D queues; enrollments; registrations; the events the Event Hubs-compatible
//! endpoint retains; C2D feedback not yet received) in one SQLite file in the data dir,
//! `store.sqlite3`, so a restarted or crashed hub serves what it acknowledged. Live sessions and
//! in-flight method calls are not kept (Azure does not keep them either).
//!
//! The hub's memory stays the source of truth for reads. Every change is queued here by name
//! (`Store::identity`, `enrollment`, ...) with a number, and `writer.rs` commits them in groups
//! on its own thread. Whoever acknowledges a change (a REST 2xx, a PUBACK, the reply to a
//! reported patch, a DPS assignment) first waits for the number to be committed (a `Ticket`, or
//! `mark` and `committed` where a connection orders its answers): acknowledged means durable.
//! `Store::in_memory` keeps nothing and every ticket is ready at once.

mod rows;
pub mod schema;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use rusqlite::Connection;
use tokio::sync::watch;

use crate::hub::ca_certs::{CaCert, CaCerts};
use crate::hub::clock;
use crate::hub::dps::{Dps, StoredRegistration};
use crate::hub::eventhub::{EventHub, Numbering};
use crate::hub::feedback::{FeedbackQueue, Pending};
use crate::hub::registry::{Identity, Registry};
pub use writer::Committed;
use writer::{Change, Sources};

/// The store's file name inside the data dir (SQLite adds `-wal` and `-shm` beside it).
pub const FILE: &str = "store.sqlite3";

/// Held locked (an OS file lock, released by the kernel when the process dies) by whoever has the
/// store open, so two hubs, or a hub and `fleetsim hub import`, never write one store.
pub const LOCK_FILE: &str = "store.lock";

/// Why the store cannot open, or can no longer make a change durable.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store in {dir} is in use by another fleetsim process (a hub, or an import or export); stop it first")]
    InUse { dir: PathBuf },
    #[error("cannot lock the store in {dir}: {source}")]
    Lock { dir: PathBuf, source: std::io::Error },
    #[error("cannot open the store {path}: {source}")]
    Open { path: PathBuf, source: rusqlite::Error },
    #[error("the store {path}: {source}")]
    Schema { path: PathBuf, source: schema::SchemaError },
    #[error(transparent)]
    Row(#[from] rows::BadRow),
    #[error("the store failed to commit; the change is not durable")]
    NotDurable,
}

/// What queues changes: the next change number and the writer's channel (one lock, so numbers
/// reach the writer in order).
struct Queue {
    next: u64,
    tx: Option<Sender<(u64, Change)>>,
}

struct Durable {
    queue: Mutex<Queue>,
    committed: watch::Receiver<Committed>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The open `LOCK_FILE`, locked; dropped (unlocked) by `close`.
    lock: Mutex<Option<std::fs::File>>,
}

/// The hub's handle on its store: durable (SQLite) or in memory.
pub struct Store {
    durable: Option<Arc<Durable>>,
}

/// The parts of the hub the store loads at open and reads from as it writes.
pub struct Parts<'a> {
    pub registry: &'a Arc<Registry>,
    pub dps: &'a Arc<Dps>,
    pub eventhub: &'a Arc<EventHub>,
    pub feedback: &'a FeedbackQueue,
    pub ca_certs: &'a CaCerts,
    /// Whether the endpoint's events are kept (`behaviour.eventhub_durable`).
    pub keep_events: bool,
}

/// A wait for every change queued before it to be committed. Owns what it needs, so a spawned
/// task can hold it.
pub struct Ticket {
    wait: Option<(u64, watch::Receiver<Committed>)>,
}

impl Ticket {
    /// Resolves once the changes are durable; `NotDurable` if the store failed or stopped first.
    pub async fn durable(self) -> Result<(), StoreError> {
        let Some((target, mut rx)) = self.wait else { return Ok(()) };
        match rx.wait_for(|c| c.seq >= target || c.failed).await {
            Ok(c) if c.seq >= target => Ok(()),
            _ => Err(StoreError::NotDurable),
        }
    }
}

impl Store {
    /// A store that keeps nothing (`--in-memory`, `in_memory = true`).
    pub fn in_memory() -> Store {
        Store { durable: None }
    }

    /// Whether changes are written to disk.
    pub fn is_durable(&self) -> bool {
        self.durable.is_some()
    }

    /// Opens (or creates) `dir/store.sqlite3`, brings its schema up to date, loads every row into
    /// the hub's `parts`, starts the writer and sets the endpoint's journal. Fails on a file it
    /// cannot read, a newer schema, or a row that does not parse (naming the row).
    pub fn open(dir: &Path, parts: Parts<'_>) -> Result<Store, StoreError> {
        let lock = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))
            .map_err(|source| StoreError::Lock { dir: dir.to_owned(), source })?;
        lock.try_lock().map_err(|e| match e {
            std::fs::TryLockError::WouldBlock => StoreError::InUse { dir: dir.to_owned() },
            std::fs::TryLockError::Error(source) => StoreError::Lock { dir: dir.to_owned(), source },
        })?;
        let path = dir.join(FILE);
        let open_err = |source| StoreError::Open { path: path.clone(), source };
        let mut conn = Connection::open(&path).map_err(open_err)?;
        // WAL: readers (a backup) never block the writer, and a commit is one append. FULL: the
        // WAL is synced at every commit, so a commit survives power loss too, not only a crash
        // of the process ("Write-Ahead Logging", "PRAGMA synchronous").
        conn.pragma_update(None, "journal_mode", "WAL").map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(open_err)?;
        schema::migrate(&mut conn).map_err(|source| StoreError::Schema { path: path.clone(), source })?;
        let written = load(&mut conn, &parts).map_err(|e| match e {
            Loaded::Sql(source) => open_err(source),
            Loaded::Row(r) => StoreError::Row(r),
        })?;
        let (done, committed) = watch::channel(Committed::default());
        let (tx, rx) = std::sync::mpsc::channel();
        let from = Sources {
            registry: parts.registry.clone(),
            dps: parts.dps.clone(),
            eventhub: parts.eventhub.clone(),
            written,
        };
        let thread = std::thread::Builder::new()
            .name("fleetsim-store".into())
            .spawn(move || writer::run(conn, rx, done, from))
            .map_err(|e| open_err(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))?;
        let durable = Arc::new(Durable {
            queue: Mutex::new(Queue { next: 1, tx: Some(tx) }),
            committed,
            thread: Mutex::new(Some(thread)),
            lock: Mutex::new(Some(lock)),
        });
        if parts.keep_events {
            let journal = Arc::downgrade(&durable);
            parts.eventhub.set_journal(Box::new(move |p| {
                if let Some(d) = journal.upgrade() {
                    d.queue(Change::Events(p));
                }
            }));
        }
        Ok(Store { durable: Some(durable) })
    }

    fn queue(&self, change: Change) {
        if let Some(d) = &self.durable {
            d.queue(change);
        }
    }

    /// An identity was created, deleted, or its record, twin or C2D queue changed. Cheap (no
    /// I/O, no serialization): callable with the identity's lock held.
    pub fn identity(&self, identity: &Arc<Identity>) {
        self.queue(Change::Identity(identity.clone()));
    }

    /// An individual enrollment was put or deleted.
    pub fn individual(&self, registration_id: &str) {
        self.queue(Change::Individual(registration_id.to_owned()));
    }

    /// A group enrollment was put or deleted.
    pub fn group(&self, group_id: &str) {
        self.queue(Change::Group(group_id.to_owned()));
    }

    /// A CA certificate was uploaded, changed (`Some`, as it is now) or deleted (`None`).
    pub fn ca_cert(&self, name: &str, cert: Option<&CaCert>) {
        self.queue(Change::CaCert(name.to_owned(), cert.map(|c| serde_json::to_string(c).unwrap_or_default())));
    }

    /// A DPS registration started or was assigned.
    pub fn registration(&self, registration_id: &str) {
        self.queue(Change::Registration(registration_id.to_owned()));
    }

    /// A C2D feedback record was queued for the service.
    pub fn feedback(&self, pending: Pending) {
        self.queue(Change::Feedback(pending));
    }

    /// The service received these feedback records: they are gone for good.
    pub fn feedback_settled(&self, ids: Vec<u64>) {
        if !ids.is_empty() {
            self.queue(Change::FeedbackSettled(ids));
        }
    }

    /// The number of the last change queued so far (0 when nothing is kept): once `committed`
    /// reaches it, everything queued before this call is durable.
    pub fn mark(&self) -> u64 {
        let Some(d) = &self.durable else { return 0 };
        d.queue.lock().unwrap_or_else(|p| p.into_inner()).next - 1
    }

    /// How far the writer has committed, to wait on (`None` when nothing is kept).
    pub fn committed(&self) -> Option<watch::Receiver<Committed>> {
        self.durable.as_ref().map(|d| d.committed.clone())
    }

    /// A ticket for everything queued so far.
    pub fn ticket(&self) -> Ticket {
        let Some(d) = &self.durable else { return Ticket { wait: None } };
        let q = d.queue.lock().unwrap_or_else(|p| p.into_inner());
        Ticket { wait: Some((q.next - 1, d.committed.clone())) }
    }

    /// Waits until everything queued so far is durable.
    pub async fn durable(&self) -> Result<(), StoreError> {
        self.ticket().durable().await
    }

    /// Stops taking changes, lets the writer commit what it has, and waits for it (blocking: call
    /// from a blocking context). Later changes are kept in memory only.
    pub fn close(&self) {
        let Some(d) = &self.durable else { return };
        d.queue.lock().unwrap_or_else(|p| p.into_inner()).tx = None;
        let thread = d.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
        d.lock.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

impl Durable {
    fn queue(&self, change: Change) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let seq = q.next;
        if let Some(tx) = &q.tx
            && tx.send((seq, change)).is_ok()
        {
            q.next += 1;
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
    }
}

enum Loaded {
    Sql(rusqlite::Error),
    Row(rows::BadRow),
}

impl From<rusqlite::Error> for Loaded {
    fn from(e: rusqlite::Error) -> Self {
        Loaded::Sql(e)
    }
}

impl From<rows::BadRow> for Loaded {
    fn from(e: rows::BadRow) -> Self {
        Loaded::Row(e)
    }
}

/// Reads every table into the hub's structures; returns, per partition of the endpoint, the next
/// sequence number the writer has to write.
fn load(conn: &mut Connection, parts: &Parts<'_>) -> Result<Vec<i64>, Loaded> {
    let wall = clock::wall();
    load_registry(conn, parts.registry, parts.dps)?;
    load_ca_certs(conn, parts.ca_certs)?;
    load_feedback(conn, parts.feedback, wall)?;
    load_events(conn, parts.eventhub, parts.keep_events, wall)
}

/// Identities, enrollments and registrations.
fn load_registry(conn: &Connection, registry: &Registry, dps: &Dps) -> Result<(), Loaded> {
    let (now, wall) = (clock::now(), clock::wall());
    let mut stmt = conn.prepare(
        "SELECT key, device_id, module_id, generation_id, auth_type, primary_key, secondary_key,
            primary_thumbprint, secondary_thumbprint, record, twin, c2d
         FROM identities",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let row = rows::IdentityRow {
            key: r.get(0)?,
            device_id: r.get(1)?,
            module_id: r.get(2)?,
            generation_id: r.get(3)?,
            auth_type: r.get(4)?,
            primary_key: r.get(5)?,
            secondary_key: r.get(6)?,
            primary_thumbprint: r.get(7)?,
            secondary_thumbprint: r.get(8)?,
            record: r.get(9)?,
            twin: r.get(10)?,
            c2d: r.get(11)?,
        };
        let (device, module) = (row.device_id.clone(), row.module_id.clone());
        let (record, twin, c2d) = row.into_state(now, wall)?;
        registry.restore(&device, module.as_deref(), record, twin, c2d);
    }
    let mut stmt = conn.prepare("SELECT kind, id, body FROM enrollments")?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let (kind, id, body): (String, String, String) = (r.get(0)?, r.get(1)?, r.get(2)?);
        match kind.as_str() {
            "individual" => dps.put_individual(rows::individual_from(&id, &body)?),
            _ => dps.put_group(rows::group_from(&id, &body)?),
        }
    }
    let mut stmt = conn.prepare("SELECT id, body FROM registrations")?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let (id, body): (String, String) = (r.get(0)?, r.get(1)?);
        let reg: StoredRegistration = rows::json("registration", &id, &body)?;
        dps.restore_registration(&id, reg, now);
    }
    Ok(())
}

/// The CA certificates uploaded to the hub.
fn load_ca_certs(conn: &Connection, cas: &CaCerts) -> Result<(), Loaded> {
    let mut stmt = conn.prepare("SELECT name, body FROM ca_certificates")?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let (name, body): (String, String) = (r.get(0)?, r.get(1)?);
        let cert: CaCert = rows::json("CA certificate", &name, &body)?;
        cas.restore(cert);
    }
    Ok(())
}

/// The feedback records not yet received, oldest first, without those past their time to live.
fn load_feedback(conn: &Connection, queue: &FeedbackQueue, wall: std::time::SystemTime) -> Result<(), Loaded> {
    let expired = crate::hub::eventhub::unix_ms(wall.checked_sub(crate::hub::feedback::TTL).unwrap_or(wall));
    let mut stmt = conn.prepare("SELECT id, body FROM feedback WHERE at_ms >= ?1 ORDER BY id")?;
    let mut rows = stmt.query([expired])?;
    let mut records = Vec::new();
    while let Some(r) = rows.next()? {
        let (id, body): (i64, String) = (r.get(0)?, r.get(1)?);
        records.push(rows::feedback_from(id as u64, &body)?);
    }
    queue.restore(records);
    Ok(())
}

/// Each partition's numbering and retained events. A store written under another partition
/// count is not loaded (a device's partition is its id's hash modulo the count, so its events
/// would land in other partitions than before): the endpoint starts empty, with a warning. With
/// `keep` off the stored events are dropped, so a later run that keeps them again does not
/// serve stale ones.
fn load_events(
    conn: &mut Connection,
    eventhub: &EventHub,
    keep: bool,
    wall: std::time::SystemTime,
) -> Result<Vec<i64>, Loaded> {
    let count = eventhub.partition_count();
    let stored: Option<String> =
        conn.query_row("SELECT value FROM settings WHERE key = 'eventhub_partitions'", [], |r| r.get(0)).ok();
    if !keep || stored.as_deref() != Some(count.to_string().as_str()) {
        if let Some(was) = stored.as_ref().filter(|_| keep) {
            tracing::warn!(
                stored = %was,
                configured = count,
                "the store's Event Hubs-compatible endpoint had another partition count; its events are not kept"
            );
        }
        let tx = conn.transaction()?;
        tx.execute_batch("DELETE FROM events; DELETE FROM eventhub_partitions;")?;
        tx.execute(
            "INSERT OR REPLACE INTO settings (key, value) VALUES ('eventhub_partitions', ?1)",
            [count.to_string()],
        )?;
        tx.commit()?;
        return Ok(vec![0; count]);
    }
    let mut written = vec![0; count];
    let mut stmt = conn.prepare(
        "SELECT partition, next_sequence, next_offset, last_sequence, last_offset, last_ms FROM eventhub_partitions",
    )?;
    let mut rows = stmt.query([])?;
    let mut numbering = vec![Numbering::default(); count];
    while let Some(r) = rows.next()? {
        let p: i64 = r.get(0)?;
        let Some(n) = usize::try_from(p).ok().and_then(|p| numbering.get_mut(p)) else { continue };
        let last: (Option<i64>, Option<i64>, Option<i64>) = (r.get(3)?, r.get(4)?, r.get(5)?);
        *n = Numbering {
            next_sequence: r.get(1)?,
            next_offset: r.get(2)?,
            last: match last {
                (Some(s), Some(o), Some(ms)) => Some((s, o, rows::from_unix_ms(ms))),
                _ => None,
            },
        };
    }
    let mut stmt = conn.prepare(
        "SELECT partition, seq, offset, enqueued_ms, source, properties, body FROM events
         WHERE partition = ?1 ORDER BY seq",
    )?;
    for (p, n) in numbering.into_iter().enumerate() {
        let mut rows = stmt.query([p as i64])?;
        let mut events = Vec::new();
        while let Some(r) = rows.next()? {
            let row = rows::EventRow {
                partition: r.get(0)?,
                seq: r.get(1)?,
                offset: r.get(2)?,
                enqueued_ms: r.get(3)?,
                source: r.get(4)?,
                properties: r.get(5)?,
                body: r.get(6)?,
            };
            events.push(row.into_event()?);
        }
        written[p] = n.next_sequence;
        eventhub.restore(p, n, events, wall);
    }
    Ok(written)
}
