//! The store's one writer: a thread of its own (disk I/O never runs on a tokio worker) that
//! takes every change queued since its last commit, writes them in one transaction and commits
//! once (group commit: one fsync for many changes), then publishes the highest change number
//! now durable. A change names what changed, not its value: the writer reads the current state
//! when it writes, so a burst of patches to one twin is written once, and deletes cannot race
//! creates (a row is deleted only under the generation that was deleted). Events of the Event
//! Hubs-compatible endpoint are written the same way: a change names the partition that grew and
//! the writer appends everything past what it wrote last, then forgets what retention dropped.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::mpsc::Receiver;

use rusqlite::{Connection, params};
use tokio::sync::watch;

use super::rows::{self, EventRow, IdentityRow};
use crate::hub::dps::Dps;
use crate::hub::eventhub::{EventHub, Numbering, unix_ms};
use crate::hub::feedback::{self, Pending};
use crate::hub::registry::{Identity, Registry};

/// What changed. The writer looks up the current value.
pub enum Change {
    /// An identity's record, twin or C2D queue, or the identity itself (created or deleted).
    Identity(Arc<Identity>),
    /// An individual enrollment (by registration id) or a group (by group id).
    Individual(String),
    Group(String),
    /// A DPS registration, by registration id.
    Registration(String),
    /// A partition of the Event Hubs-compatible endpoint was appended to.
    Events(usize),
    /// A C2D feedback record was queued (carried whole: a reader may take it before the write).
    Feedback(Pending),
    /// The service received these feedback records.
    FeedbackSettled(Vec<u64>),
    /// A CA certificate by name: its row (JSON) as it was when queued, or `None` once deleted.
    /// Written in queue order, so the last change of a batch is what stays.
    CaCert(String, Option<String>),
}

/// What the writer works on: the hub's parts it reads current values from, and how far it has
/// written each partition of the endpoint (the next sequence number not yet on disk).
pub struct Sources {
    pub registry: Arc<Registry>,
    pub dps: Arc<Dps>,
    pub eventhub: Arc<EventHub>,
    pub written: Vec<i64>,
}

/// How far the writer got: every change numbered up to `seq` is committed. `failed` is set for
/// good once a commit fails; nothing after it is acknowledged.
#[derive(Debug, Clone, Copy, Default)]
pub struct Committed {
    pub seq: u64,
    pub failed: bool,
}

/// At most this many changes go into one transaction, so one commit stays short.
const MAX_BATCH: usize = 20_000;

/// Runs until every sender is gone, then returns (the last batch committed).
pub fn run(mut conn: Connection, rx: Receiver<(u64, Change)>, done: watch::Sender<Committed>, mut from: Sources) {
    let mut batch = Vec::new();
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let last = batch.last().map_or(0, |(seq, _)| *seq);
        match write(&mut conn, &batch, &mut from) {
            Ok(()) => {
                done.send_modify(|c| c.seq = last);
            }
            Err(e) => {
                tracing::error!(error = %e, "the store could not commit; changes are no longer acknowledged");
                done.send_modify(|c| c.failed = true);
            }
        }
        batch.clear();
    }
}

fn write(conn: &mut Connection, batch: &[(u64, Change)], from: &mut Sources) -> rusqlite::Result<()> {
    let (registry, dps) = (&*from.registry, &*from.dps);
    let (now, wall) = (crate::hub::clock::now(), crate::hub::clock::wall());
    let tx = conn.transaction()?;
    let mut grown = Vec::new();
    let mut feedback_changed = false;
    {
        let mut upsert = tx.prepare_cached(
            "INSERT INTO identities (key, device_id, module_id, generation_id, auth_type, primary_key,
                secondary_key, primary_thumbprint, secondary_thumbprint, record, twin, c2d)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
             ON CONFLICT (key) DO UPDATE SET device_id = excluded.device_id, module_id = excluded.module_id,
                generation_id = excluded.generation_id, auth_type = excluded.auth_type,
                primary_key = excluded.primary_key, secondary_key = excluded.secondary_key,
                primary_thumbprint = excluded.primary_thumbprint,
                secondary_thumbprint = excluded.secondary_thumbprint,
                record = excluded.record, twin = excluded.twin, c2d = excluded.c2d",
        )?;
        let mut delete = tx.prepare_cached("DELETE FROM identities WHERE key = ?1 AND generation_id = ?2")?;
        let mut put_enrollment = tx.prepare_cached(
            "INSERT INTO enrollments (kind, id, body) VALUES (?1, ?2, ?3)
             ON CONFLICT (kind, id) DO UPDATE SET body = excluded.body",
        )?;
        let mut del_enrollment = tx.prepare_cached("DELETE FROM enrollments WHERE kind = ?1 AND id = ?2")?;
        let mut put_reg = tx.prepare_cached(
            "INSERT INTO registrations (id, body) VALUES (?1, ?2) ON CONFLICT (id) DO UPDATE SET body = excluded.body",
        )?;
        let mut put_ca = tx.prepare_cached(
            "INSERT INTO ca_certificates (name, body) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET body = excluded.body",
        )?;
        let mut del_ca = tx.prepare_cached("DELETE FROM ca_certificates WHERE name = ?1")?;
        let mut seen_identities = HashSet::new();
        let mut seen_names = HashSet::new();
        for (_, change) in batch {
            match change {
                Change::Identity(identity) => {
                    if !seen_identities.insert(Arc::as_ptr(identity)) {
                        continue;
                    }
                    let key = identity.key();
                    // Current is checked before the lock is taken: the registry's map lock is
                    // never taken while an identity's is held.
                    let current = registry.is_current(identity);
                    let st = identity.lock();
                    if current && !st.removed {
                        let row =
                            IdentityRow::of(key, &identity.device_id, identity.module_id.as_deref(), &st, now, wall);
                        drop(st);
                        upsert.execute(params![
                            row.key,
                            row.device_id,
                            row.module_id,
                            row.generation_id,
                            row.auth_type,
                            row.primary_key,
                            row.secondary_key,
                            row.primary_thumbprint,
                            row.secondary_thumbprint,
                            row.record,
                            row.twin,
                            row.c2d
                        ])?;
                    } else {
                        let generation = st.record.generation_id.clone();
                        drop(st);
                        delete.execute(params![key, generation])?;
                    }
                }
                Change::Individual(id) => {
                    let folded = id.to_ascii_lowercase();
                    if !seen_names.insert(("individual", folded.clone())) {
                        continue;
                    }
                    match dps.get_individual(id) {
                        Some(e) => put_enrollment.execute(params!["individual", folded, rows::individual_body(&e)])?,
                        None => del_enrollment.execute(params!["individual", folded])?,
                    };
                }
                Change::Group(id) => {
                    if !seen_names.insert(("group", id.clone())) {
                        continue;
                    }
                    match dps.get_group(id) {
                        Some(g) => put_enrollment.execute(params!["group", id, rows::group_body(&g)])?,
                        None => del_enrollment.execute(params!["group", id])?,
                    };
                }
                Change::CaCert(name, body) => {
                    match body {
                        Some(b) => put_ca.execute(params![name, b])?,
                        None => del_ca.execute(params![name])?,
                    };
                }
                Change::Registration(id) => {
                    let folded = id.to_ascii_lowercase();
                    if !seen_names.insert(("registration", folded.clone())) {
                        continue;
                    }
                    if let Some(r) = dps.stored_registration(id) {
                        put_reg.execute(params![folded, serde_json::to_string(&r).unwrap_or_default()])?;
                    }
                }
                Change::Events(p) => {
                    if !grown.contains(p) {
                        grown.push(*p);
                    }
                }
                Change::Feedback(pending) => {
                    feedback_changed = true;
                    tx.prepare_cached("INSERT OR REPLACE INTO feedback (id, at_ms, body) VALUES (?1, ?2, ?3)")?
                        .execute(params![
                            pending.id as i64,
                            unix_ms(pending.record.at),
                            rows::feedback_body(&pending.record)
                        ])?;
                }
                Change::FeedbackSettled(ids) => {
                    let mut del = tx.prepare_cached("DELETE FROM feedback WHERE id = ?1")?;
                    for id in ids {
                        del.execute(params![*id as i64])?;
                    }
                }
            }
        }
    }
    for p in grown {
        write_events(&tx, from, p, wall)?;
    }
    if feedback_changed {
        // Records past the queue's time to live are dropped from memory when a reader next
        // looks; here too, so the table stays bounded.
        let expired = unix_ms(wall.checked_sub(feedback::TTL).unwrap_or(std::time::SystemTime::UNIX_EPOCH));
        tx.prepare_cached("DELETE FROM feedback WHERE at_ms < ?1")?.execute(params![expired])?;
    }
    tx.commit()
}

/// Appends partition `p`'s events past what was written, drops the rows retention dropped, and
/// records the partition's numbering as of the last event written.
fn write_events(
    tx: &rusqlite::Transaction<'_>,
    from: &mut Sources,
    p: usize,
    wall: std::time::SystemTime,
) -> rusqlite::Result<()> {
    let Some(written) = from.written.get_mut(p) else { return Ok(()) };
    let events = from.eventhub.read(p, *written, usize::MAX, wall);
    let mut insert = tx.prepare_cached(
        "INSERT OR REPLACE INTO events (partition, seq, offset, enqueued_ms, source, properties, body)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    for e in &events {
        let r = EventRow::of(p, e);
        insert.execute(params![r.partition, r.seq, r.offset, r.enqueued_ms, r.source, r.properties, r.body])?;
    }
    let (_, begin) = from.eventhub.numbering(p);
    tx.prepare_cached("DELETE FROM events WHERE partition = ?1 AND seq < ?2")?.execute(params![p as i64, begin])?;
    // The numbering as of the last row written, never of the partition now: an event appended
    // since this read is not in this transaction, and numbering past it would leave it unwritten
    // for good (its own change would find `written` already beyond it).
    let Some(numbering) = events.last().map(Numbering::after) else { return Ok(()) };
    *written = numbering.next_sequence;
    let (last_seq, last_offset, last_ms) = match numbering.last {
        Some((s, o, t)) => (Some(s), Some(o), Some(unix_ms(t))),
        None => (None, None, None),
    };
    tx.prepare_cached(
        "INSERT OR REPLACE INTO eventhub_partitions (partition, next_sequence, next_offset, last_sequence,
            last_offset, last_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![p as i64, numbering.next_sequence, numbering.next_offset, last_seq, last_offset, last_ms])?;
    Ok(())
}
