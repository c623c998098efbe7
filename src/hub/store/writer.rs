//! The store's one writer: a thread of its own (disk I/O never runs on a tokio worker) that
//! takes every change queued since its last commit, writes them in one transaction and commits
//! once (group commit: one fsync for many changes), then publishes the highest change number
//! now durable. A change names what changed, not its value: the writer reads the current state
//! when it writes, so a burst of patches to one twin is written once, and deletes cannot race
//! creates (a row is deleted only under the generation that was deleted).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::mpsc::Receiver;

use rusqlite::{Connection, params};
use tokio::sync::watch;

use super::rows::{self, IdentityRow};
use crate::hub::dps::Dps;
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
pub fn run(
    mut conn: Connection,
    rx: Receiver<(u64, Change)>,
    done: watch::Sender<Committed>,
    registry: Arc<Registry>,
    dps: Arc<Dps>,
) {
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
        match write(&mut conn, &batch, &registry, &dps) {
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

fn write(conn: &mut Connection, batch: &[(u64, Change)], registry: &Registry, dps: &Dps) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut upsert = tx.prepare_cached(
            "INSERT INTO identities (key, device_id, module_id, generation_id, auth_type, primary_key,
                secondary_key, record, twin, c2d)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
             ON CONFLICT (key) DO UPDATE SET device_id = excluded.device_id, module_id = excluded.module_id,
                generation_id = excluded.generation_id, auth_type = excluded.auth_type,
                primary_key = excluded.primary_key, secondary_key = excluded.secondary_key,
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
                        let row = IdentityRow::of(key, &identity.device_id, identity.module_id.as_deref(), &st);
                        drop(st);
                        upsert.execute(params![
                            row.key,
                            row.device_id,
                            row.module_id,
                            row.generation_id,
                            row.auth_type,
                            row.primary_key,
                            row.secondary_key,
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
                Change::Registration(id) => {
                    let folded = id.to_ascii_lowercase();
                    if !seen_names.insert(("registration", folded.clone())) {
                        continue;
                    }
                    if let Some(r) = dps.stored_registration(id) {
                        put_reg.execute(params![folded, serde_json::to_string(&r).unwrap_or_default()])?;
                    }
                }
            }
        }
    }
    tx.commit()
}
