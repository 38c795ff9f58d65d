//! The SQLite store: one connection (WAL, `synchronous = FULL`, foreign
//! keys on) behind a mutex; a transaction holds the mutex from begin to
//! commit or rollback. Write transactions are `BEGIN IMMEDIATE`, so the
//! master key id and the audit head read inside one cannot change before
//! it commits. Statements are prepared once per connection
//! (`prepare_cached`).
//!
//! The only files of the server that import `rusqlite` are in this folder.

mod approvals;
mod attest;
mod guests;
mod halves;
mod hosts;
mod meta;
mod policies;
pub mod schema;
mod volumes;

use std::path::Path;
use std::str::FromStr;
use std::sync::{Mutex, MutexGuard};

use rusqlite::Connection;

use crate::model::StoreError;
use crate::store::{Access, Store, Tx};

/// The SQLite database of a data directory (or one in memory, for tests).
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and applies pending
    /// schema migrations.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Self::with(conn)
    }

    /// A fresh database in memory with the current schema (for tests).
    pub fn in_memory() -> Result<Self, StoreError> {
        Self::with(Connection::open_in_memory()?)
    }

    fn with(mut conn: Connection) -> Result<Self, StoreError> {
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.set_prepared_statement_cache_capacity(128);
        schema::migrate(&mut conn)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (the
        // transaction is rolled back when its guard drops), so a poisoned
        // lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Store for SqliteStore {
    fn begin(&self, access: Access) -> Result<Box<dyn Tx + '_>, StoreError> {
        let conn = self.lock();
        conn.execute_batch(match access {
            Access::Read => "BEGIN DEFERRED",
            Access::Write => "BEGIN IMMEDIATE",
        })?;
        Ok(Box::new(SqliteTx { conn, open: true }))
    }
}

/// A transaction on the connection; rolled back on drop unless committed.
pub(crate) struct SqliteTx<'a> {
    conn: MutexGuard<'a, Connection>,
    open: bool,
}

impl Tx for SqliteTx<'_> {
    fn commit(mut self: Box<Self>) -> Result<(), StoreError> {
        self.conn.execute_batch("COMMIT")?;
        self.open = false;
        Ok(())
    }
}

impl Drop for SqliteTx<'_> {
    fn drop(&mut self) {
        if self.open {
            if let Err(e) = self.conn.execute_batch("ROLLBACK") {
                tracing::error!(error = %e, "cannot roll back a transaction");
            }
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        // A value our row parsers refused comes back as itself.
        if let rusqlite::Error::FromSqlConversionFailure(_, _, inner) = &e {
            if let Some(Corrupt(what)) = inner.downcast_ref::<Corrupt>() {
                return StoreError::Corrupt(what.clone());
            }
        }
        StoreError::Backend(Box::new(e))
    }
}

/// A column value this server does not know.
#[derive(Debug)]
struct Corrupt(String);

impl std::fmt::Display for Corrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Corrupt {}

/// Column `idx` of `row` parsed as a typed value; `what` names the column
/// in the error (`volumes.state`).
fn typed<T: FromStr>(row: &rusqlite::Row<'_>, idx: usize, what: &str) -> rusqlite::Result<T> {
    let text: String = row.get(idx)?;
    text.parse().map_err(|_| {
        rusqlite::Error::FromSqlConversionFailure(
            idx,
            rusqlite::types::Type::Text,
            Box::new(Corrupt(format!("{what} {text:?}"))),
        )
    })
}

/// A stored integer that is never negative, as u64.
fn unsigned(row: &rusqlite::Row<'_>, idx: usize) -> rusqlite::Result<u64> {
    Ok(row.get::<_, i64>(idx)?.max(0) as u64)
}

/// A u64 as SQLite's i64 (values above i64::MAX do not occur: sizes,
/// generations and durations are bounded far below it).
fn signed(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
impl SqliteStore {
    /// Runs raw SQL on the database as an attacker with the file would
    /// (tests of tamper detection); returns SQLite's error text.
    pub(crate) fn tamper(&self, sql: &str) -> Result<(), String> {
        self.lock().execute_batch(sql).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Access, Store};

    #[test]
    fn a_dropped_transaction_rolls_back_and_a_committed_one_stays() {
        let s = SqliteStore::in_memory().unwrap();
        {
            let mut tx = s.begin(Access::Write).unwrap();
            tx.set_master_key_id("dropped").unwrap();
        }
        let mut tx = s.begin(Access::Read).unwrap();
        assert_eq!(tx.master_key_id().unwrap(), None);
        drop(tx);
        let mut tx = s.begin(Access::Write).unwrap();
        tx.set_master_key_id("kept").unwrap();
        tx.commit().unwrap();
        let mut tx = s.begin(Access::Read).unwrap();
        assert_eq!(tx.master_key_id().unwrap().as_deref(), Some("kept"));
    }

    #[test]
    fn volume_look_ups_use_an_index() {
        // `volume show` and `guest define` look volumes up by UUID, name and
        // path: a table scan costs milliseconds at 100,000 volumes.
        let s = SqliteStore::in_memory().unwrap();
        let conn = s.lock();
        for w in [volumes::FIND, volumes::NAMED, volumes::AT_PATH] {
            let sql = format!("EXPLAIN QUERY PLAN SELECT v.id FROM volumes v {w}");
            let mut stmt = conn.prepare(&sql).unwrap();
            let plan: Vec<String> = stmt
                .query_map(["x"], |r| r.get::<_, String>(3))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            assert!(plan.iter().all(|p| !p.starts_with("SCAN")), "{w}: {plan:?}");
        }
    }

    #[test]
    fn an_unknown_state_in_a_row_is_reported_as_corrupt() {
        let s = SqliteStore::in_memory().unwrap();
        {
            let conn = s.lock();
            conn.execute_batch(
                "INSERT INTO hosts (name, address, state, created) VALUES ('h', 'h:1', 'enrolled', 0);
                 INSERT INTO volumes (id, name, host, pool, format, capacity, secret_uuid, generation, state, created)
                 VALUES ('v', 'v', 'h', 'p', 'qcow2', 1, 's', 1, 'sideways', 0);",
            )
            .unwrap();
        }
        let mut tx = s.begin(Access::Read).unwrap();
        let e = tx.volume("v").unwrap_err();
        assert!(
            matches!(&e, StoreError::Corrupt(w) if w.contains("volumes.state \"sideways\"")),
            "{e}"
        );
    }
}
