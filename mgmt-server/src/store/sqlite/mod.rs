//! The SQLite store: one connection (WAL, `synchronous = FULL`, foreign
//! keys on) behind a mutex; a transaction holds the mutex from begin to
//! commit or rollback. Write transactions are `BEGIN IMMEDIATE`, so the
//! master key id and the audit head read inside one cannot change before
//! it commits. Statements are prepared once per connection
//! (`prepare_cached`). The queries themselves are the engine-neutral ones
//! of [`crate::store::sql`].
//!
//! The only files of the server that import `rusqlite` are in this folder.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::Connection;
use rusqlite::types::ValueRef;

use crate::model::StoreError;
use crate::store::sql::schema::{Engine, MIGRATIONS, pending};
use crate::store::sql::{Conn, Row, SqlTx, Value};
use crate::store::{Access, Counters, Store, StoreStats, Tx};

/// The SQLite database of a data directory (or one in memory, for tests).
pub struct SqliteStore {
    conn: Mutex<Connection>,
    counters: Counters,
    /// Every statement prepared on it (tests check their query plans).
    #[cfg(test)]
    pub(crate) seen: Mutex<std::collections::BTreeSet<String>>,
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
        migrate(&mut conn)?;
        Ok(Self {
            conn: Mutex::new(conn),
            counters: Counters::default(),
            #[cfg(test)]
            seen: Mutex::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (the
        // transaction is rolled back when its guard drops), so a poisoned
        // lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Applies the migrations this database has not had yet.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for i in pending(version)? {
        let tx = conn.transaction()?;
        tx.execute_batch(&MIGRATIONS[i].sql(Engine::Sqlite))?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

impl SqliteStore {
    /// A transaction as a plain connection (tools that copy tables).
    pub fn begin_conn(&self, access: Access) -> Result<Box<dyn Conn + '_>, StoreError> {
        let started = std::time::Instant::now();
        let conn = self.lock();
        let begun = conn.execute_batch(match access {
            Access::Read => "BEGIN DEFERRED",
            Access::Write => "BEGIN IMMEDIATE",
        });
        self.counters.count(started);
        begun?;
        Ok(Box::new(SqliteConn {
            conn,
            open: true,
            counters: &self.counters,
            #[cfg(test)]
            seen: &self.seen,
        }))
    }

    /// Opens a copy of a database (a backup) read-only: nothing is written
    /// to it, not even a migration; its schema must be this build's.
    pub fn open_read_only(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if usize::try_from(version).ok() != Some(MIGRATIONS.len()) {
            return Err(StoreError::Corrupt(format!(
                "schema version {version}, not this build's {}",
                MIGRATIONS.len()
            )));
        }
        conn.pragma_update(None, "foreign_keys", "ON")?;
        Ok(Self {
            conn: Mutex::new(conn),
            counters: Counters::default(),
            #[cfg(test)]
            seen: Mutex::default(),
        })
    }

    /// Writes a consistent copy of the database, as of one instant, into
    /// `dest` (`VACUUM INTO`: safe while the server writes; `dest` must be
    /// absent or an empty file, which keeps its mode).
    pub fn backup_into(&self, dest: &Path) -> Result<(), StoreError> {
        let dest = dest.to_str().ok_or_else(|| {
            StoreError::Backend(format!("{} is not UTF-8", dest.display()).into())
        })?;
        self.lock().execute("VACUUM INTO ?1", [dest])?;
        Ok(())
    }

    /// SQLite's own check of every page and index (`PRAGMA
    /// integrity_check`): the problems it found, none if sound.
    pub fn integrity_problems(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare("PRAGMA integrity_check")?;
        let lines: Vec<String> = stmt
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(lines.into_iter().filter(|l| l != "ok").collect())
    }

    /// The tables of the schema and their columns, in creation order.
    pub fn tables(&self) -> Result<Vec<(String, Vec<String>)>, StoreError> {
        let conn = self.lock();
        let names: Vec<String> = conn
            .prepare(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY rowid",
            )?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let mut out = Vec::new();
        for name in names {
            let cols: Vec<String> = conn
                .prepare("SELECT name FROM pragma_table_info(?1) ORDER BY cid")?
                .query_map([&name], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            out.push((name, cols));
        }
        Ok(out)
    }
}

impl Store for SqliteStore {
    fn begin(&self, access: Access) -> Result<Box<dyn Tx + '_>, StoreError> {
        Ok(Box::new(SqlTx::new(self.begin_conn(access)?)))
    }

    fn stats(&self) -> StoreStats {
        self.counters.stats()
    }
}

/// A transaction on the connection; rolled back on drop unless committed.
struct SqliteConn<'a> {
    conn: MutexGuard<'a, Connection>,
    open: bool,
    counters: &'a Counters,
    #[cfg(test)]
    seen: &'a Mutex<std::collections::BTreeSet<String>>,
}

impl SqliteConn<'_> {
    #[cfg(test)]
    fn saw(&self, sql: &str) {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sql.to_owned());
    }

    fn prepare<'s>(
        conn: &'s Connection,
        sql: &str,
        params: &[Value],
    ) -> Result<rusqlite::CachedStatement<'s>, StoreError> {
        let mut stmt = conn.prepare_cached(sql)?;
        // `$N` are named parameters to SQLite: bind each by its name.
        for (i, v) in params.iter().enumerate() {
            let name = format!("${}", i + 1);
            let idx = stmt.parameter_index(&name)?.ok_or_else(|| {
                StoreError::Backend(format!("{name} is not in the statement").into())
            })?;
            match v {
                Value::Null => stmt.raw_bind_parameter(idx, rusqlite::types::Null)?,
                Value::Int(n) => stmt.raw_bind_parameter(idx, n)?,
                Value::Text(t) => stmt.raw_bind_parameter(idx, t)?,
                Value::Blob(b) => stmt.raw_bind_parameter(idx, b)?,
            }
        }
        Ok(stmt)
    }

    fn rows_now(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, StoreError> {
        #[cfg(test)]
        self.saw(sql);
        let mut stmt = Self::prepare(&self.conn, sql, params)?;
        let n = stmt.column_count();
        let mut rows = stmt.raw_query();
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let mut cols = Vec::with_capacity(n);
            for i in 0..n {
                cols.push(match r.get_ref(i)? {
                    ValueRef::Null => Value::Null,
                    ValueRef::Integer(v) => Value::Int(v),
                    ValueRef::Real(v) => Value::Int(v as i64),
                    ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
                    ValueRef::Blob(b) => Value::Blob(b.to_vec()),
                });
            }
            out.push(Row(cols));
        }
        Ok(out)
    }
}

impl Conn for SqliteConn<'_> {
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, StoreError> {
        #[cfg(test)]
        self.saw(sql);
        let started = std::time::Instant::now();
        let r = Self::prepare(&self.conn, sql, params)
            .and_then(|mut stmt| Ok(stmt.raw_execute()? as u64));
        self.counters.count(started);
        r
    }

    fn rows(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, StoreError> {
        let started = std::time::Instant::now();
        let r = self.rows_now(sql, params);
        self.counters.count(started);
        r
    }

    fn commit(&mut self) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let r = self.conn.execute_batch("COMMIT");
        self.counters.count(started);
        r?;
        self.open = false;
        Ok(())
    }

    fn engine(&self) -> Engine {
        Engine::Sqlite
    }
}

impl Drop for SqliteConn<'_> {
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
        StoreError::Backend(Box::new(e))
    }
}

#[cfg(test)]
impl SqliteStore {
    /// Runs raw SQL on the database as an attacker with the file would
    /// (tests of tamper detection); returns SQLite's error text.
    pub(crate) fn tamper(&self, sql: &str) -> Result<(), String> {
        self.lock().execute_batch(sql).map_err(|e| e.to_string())
    }

    /// The lines of `EXPLAIN QUERY PLAN sql` (parameters unbound).
    pub(crate) fn query_plan(&self, sql: &str) -> Result<Vec<String>, String> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .map_err(|e| e.to_string())?;
        let mut rows = stmt.raw_query();
        let mut out = vec![];
        while let Some(r) = rows.next().map_err(|e| e.to_string())? {
            out.push(r.get::<_, String>(3).map_err(|e| e.to_string())?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sql;
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
        for w in [sql::FIND, sql::NAMED, sql::AT_PATH] {
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
