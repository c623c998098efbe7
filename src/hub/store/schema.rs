//! The store's tables and how a file of an older shape is brought up to date. The file's
//! `PRAGMA user_version` is the number of migrations applied; each migration runs once, in order,
//! in the transaction that bumps it, so a crash mid-migration leaves the older shape intact
//! (SQLite: "PRAGMA user_version", "Transaction").

use rusqlite::Connection;

/// One step from version `i` to `i + 1`. Never edit a released step: add one.
const MIGRATIONS: &[&str] = &[
    // 1: identities (devices and modules) with their credentials, twin and C2D queue;
    // enrollments; DPS registrations. `auth_type` and the thumbprints are the registry's X.509
    // fields (`sas`, `selfSigned`, `certificateAuthority`, `none`, as IoT Hub's `authentication.type`),
    // columns already so that X.509 identities need no change of shape.
    "CREATE TABLE identities (
        key TEXT PRIMARY KEY NOT NULL,
        device_id TEXT NOT NULL,
        module_id TEXT,
        generation_id TEXT NOT NULL,
        auth_type TEXT NOT NULL DEFAULT 'sas',
        primary_key TEXT,
        secondary_key TEXT,
        primary_thumbprint TEXT,
        secondary_thumbprint TEXT,
        record TEXT NOT NULL,
        twin TEXT NOT NULL,
        c2d TEXT NOT NULL
    );
    CREATE TABLE enrollments (
        kind TEXT NOT NULL,
        id TEXT NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (kind, id)
    );
    CREATE TABLE registrations (
        id TEXT PRIMARY KEY NOT NULL,
        body TEXT NOT NULL
    );",
    // 2: the Event Hubs-compatible endpoint's retained events (one row each, the body as a blob,
    // the properties as JSON) and each partition's numbering, kept even when no event is retained
    // so numbering resumes where it stopped; the partition count they were written under; C2D
    // feedback records not yet received by the service.
    "CREATE TABLE events (
        partition INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        offset INTEGER NOT NULL,
        enqueued_ms INTEGER NOT NULL,
        source TEXT NOT NULL,
        properties TEXT NOT NULL,
        body BLOB NOT NULL,
        PRIMARY KEY (partition, seq)
    ) WITHOUT ROWID;
    CREATE TABLE eventhub_partitions (
        partition INTEGER PRIMARY KEY NOT NULL,
        next_sequence INTEGER NOT NULL,
        next_offset INTEGER NOT NULL,
        last_sequence INTEGER,
        last_offset INTEGER,
        last_ms INTEGER
    );
    CREATE TABLE settings (
        key TEXT PRIMARY KEY NOT NULL,
        value TEXT NOT NULL
    );
    CREATE TABLE feedback (
        id INTEGER PRIMARY KEY NOT NULL,
        at_ms INTEGER NOT NULL,
        body TEXT NOT NULL
    );",
    // 3: the CA certificates uploaded to the hub (`ca_certs.rs`), one JSON body per name.
    "CREATE TABLE ca_certificates (
        name TEXT PRIMARY KEY NOT NULL,
        body TEXT NOT NULL
    );",
];

/// The schema version this build writes.
pub const VERSION: u32 = MIGRATIONS.len() as u32;

/// Why a store file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("the store was written by a newer fleetsim (schema {found}, this build knows up to {VERSION})")]
    TooNew { found: u32 },
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
}

/// Brings `conn` to `VERSION`, one migration per transaction. Returns the version found.
pub fn migrate(conn: &mut Connection) -> Result<u32, SchemaError> {
    let found: u32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > VERSION {
        return Err(SchemaError::TooNew { found });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as u32 + 1)?;
        tx.commit()?;
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrates_once_and_refuses_a_newer_file() {
        let mut c = Connection::open_in_memory().unwrap();
        assert_eq!(migrate(&mut c).unwrap(), 0);
        assert_eq!(migrate(&mut c).unwrap(), VERSION);
        assert_eq!(VERSION, 3);
        let tables: i64 =
            c.query_row("SELECT count(*) FROM sqlite_master WHERE type = 'table'", [], |r| r.get(0)).unwrap();
        assert_eq!(tables, 8);
        c.pragma_update(None, "user_version", VERSION + 1).unwrap();
        assert!(matches!(migrate(&mut c), Err(SchemaError::TooNew { found }) if found == VERSION + 1));
    }

    #[test]
    fn a_store_of_an_older_shape_keeps_its_rows() {
        let mut c = Connection::open_in_memory().unwrap();
        c.execute_batch(MIGRATIONS[0]).unwrap();
        c.pragma_update(None, "user_version", 1).unwrap();
        c.execute("INSERT INTO registrations (id, body) VALUES ('r1', '{}')", []).unwrap();
        assert_eq!(migrate(&mut c).unwrap(), 1);
        let kept: i64 = c.query_row("SELECT count(*) FROM registrations", [], |r| r.get(0)).unwrap();
        let events: i64 = c.query_row("SELECT count(*) FROM events", [], |r| r.get(0)).unwrap();
        assert_eq!((kept, events), (1, 0));
    }
}
