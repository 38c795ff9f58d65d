//! `guestkey-server move-to-postgres`: an installation's SQLite database
//! copied into an empty PostgreSQL database, verified there, and the data
//! directory switched to it.
//!
//! The server must be stopped (the data directory's lock is taken). The
//! whole copy is one PostgreSQL transaction, verified before it commits:
//! every table's row count equals SQLite's, the audit chain verifies (hashes,
//! links, MACs, head), and every volume key and key half unwraps under the
//! master key. Anything short of that rolls the copy back: the target stays
//! empty and the data directory keeps using SQLite. After the commit the
//! data directory records the URL (`DATA_DIR/database`, 0600) and the
//! SQLite file is kept beside it as `guestkey.db.before-postgres`.

use crate::database::Database;
use crate::datadir::{DataDir, write_private_file};
use crate::domain::audit;
use crate::domain::keyring::load_matching;
use crate::masterkey::MasterKeySource;
use crate::model::CoreError;
use crate::store::postgres::PostgresStore;
use crate::store::sql::{SqlTx, Value};
use crate::store::sqlite::SqliteStore;
use crate::store::{Access, Store, Tx};

/// Tables in the order they are copied (a row's references first). Every
/// table of the schema is named here or in [`NOT_COPIED`]; a test checks.
pub const COPIED: &[&str] = &[
    "meta",
    "admins",
    "audit_keys",
    "audit",
    "hosts",
    "host_inventory",
    "host_attestation",
    "attestation_allow",
    "attestation_versions",
    "volumes",
    "volume_keys",
    "policies",
    "managed_pools",
    "console_users",
    "guests",
    "guest_disks",
    "guest_migrations",
    "release_requests",
    "escrow_packets",
    "recovery",
    "key_halves",
    "half_challenges",
];

/// What is not copied: who leads and which replicas run is about running
/// processes, not the installation; console sessions end with the move.
pub const NOT_COPIED: &[&str] = &["leader_lease", "replicas", "console_sessions"];

/// Rows read from SQLite at a time.
const BATCH: i64 = 2000;

/// What was copied.
#[derive(Debug, Clone)]
pub struct Moved {
    /// Rows per table.
    pub tables: Vec<(String, u64)>,
    /// Volume keys and key halves that unwrapped.
    pub keys: usize,
    /// Audit records verified.
    pub audit_records: u64,
    /// The database now used (no password).
    pub database: String,
    /// Where the SQLite file went.
    pub kept: std::path::PathBuf,
}

/// Moves `dir`'s SQLite database to the empty PostgreSQL database `url`.
pub fn move_to_postgres(
    dir: &DataDir,
    url: &str,
    source: Option<MasterKeySource>,
) -> Result<Moved, CoreError> {
    let _lock = dir
        .hold("stop the server first: the database moves while nothing writes to it")
        .map_err(|e| CoreError::FailedPrecondition(e.to_string()))?;
    match Database::of(dir, None)? {
        Database::Sqlite(p) if p.exists() => {}
        Database::Sqlite(_) => {
            return Err(CoreError::FailedPrecondition(format!(
                "{} is not a guestkey data directory (no guestkey.db)",
                dir.root().display()
            )));
        }
        other => {
            return Err(CoreError::FailedPrecondition(format!(
                "{} already uses {}",
                dir.root().display(),
                other.shown()
            )));
        }
    }
    let target = match Database::parse(url, dir)? {
        Database::Postgres(u) => u,
        Database::Sqlite(_) => {
            return Err(CoreError::FailedPrecondition(
                "the target must be a postgres:// URL".into(),
            ));
        }
    };
    let sqlite = SqliteStore::open(&dir.db())?;
    let tables = sqlite.tables()?;
    for (t, _) in &tables {
        if !COPIED.contains(&t.as_str()) && !NOT_COPIED.contains(&t.as_str()) {
            return Err(CoreError::Internal(format!(
                "table {t} is not known to move-to-postgres: upgrade guestkey-server"
            )));
        }
    }
    let expected_id = sqlite
        .begin(Access::Read)?
        .master_key_id()?
        .unwrap_or_default();
    let source = source.unwrap_or_else(|| dir.default_master_key_source());
    let master = load_matching(&source, &expected_id)?;

    let pg = PostgresStore::open(&target, 2)?;
    let shown = Database::Postgres(target.clone()).shown();
    let mut conn = pg.begin_conn(Access::Write)?;
    for t in COPIED.iter().chain(NOT_COPIED) {
        let n = count(&mut *conn, t)?;
        if n > 0 {
            return Err(CoreError::AlreadyExists(format!(
                "{shown} is not empty (table {t} has {n} rows): move-to-postgres never writes over a database; give an empty one"
            )));
        }
    }
    let mut copied = Vec::new();
    for t in COPIED {
        let Some((_, cols)) = tables.iter().find(|(name, _)| name == t) else {
            continue;
        };
        let n = copy_table(&sqlite, &mut *conn, t, cols)?;
        let there = count(&mut *conn, t)?;
        if there != n {
            return Err(CoreError::Internal(format!(
                "table {t}: {n} rows read from SQLite, {there} in {shown}: nothing was moved"
            )));
        }
        copied.push(((*t).to_owned(), n));
    }
    // Verified in the same transaction, before it commits.
    let mut tx: Box<dyn Tx + '_> = Box::new(SqlTx::new(conn));
    let audit_key = {
        let w = tx.audit_key()?.ok_or_else(|| {
            CoreError::Internal("the database has no audit key: nothing was moved".into())
        })?;
        master
            .unwrap_audit_key(&w.master_key_id, &w.wrapped)
            .map_err(|e| CoreError::Internal(format!("the audit key: {e}: nothing was moved")))?
    };
    let v = audit::verify(&mut *tx, &audit_key, &[])?;
    if !v.ok {
        return Err(CoreError::Internal(format!(
            "the audit chain in {shown} does not verify ({}): nothing was moved (check the SQLite one with `guestkeyctl audit --verify`)",
            v.problem
        )));
    }
    let mut keys = 0;
    for (id, generation, w) in tx.all_volume_keys()? {
        master
            .unwrap_key(&id, generation, &w.master_key_id, &w.wrapped)
            .map_err(|e| {
                CoreError::Internal(format!(
                    "the key of volume {id} generation {generation} does not unwrap ({e}): nothing was moved"
                ))
            })?;
        keys += 1;
    }
    for (id, generation, w) in tx.all_key_halves()? {
        master
            .unwrap_key(&format!("half:{id}"), generation, &w.master_key_id, &w.wrapped)
            .map_err(|e| {
                CoreError::Internal(format!(
                    "the half of volume {id} generation {generation} does not unwrap ({e}): nothing was moved"
                ))
            })?;
        keys += 1;
    }
    tx.commit()?;
    drop(sqlite);

    // The data directory uses PostgreSQL from now on.
    write_private_file(&dir.database_file(), format!("{target}\n").as_bytes()).map_err(|e| {
        CoreError::Internal(format!(
            "{shown} holds the verified copy, but {} could not be written ({e}): write the URL into it by hand (mode 0600)",
            dir.database_file().display()
        ))
    })?;
    let kept = dir.root().join("guestkey.db.before-postgres");
    for (from, to) in [
        (dir.db(), kept.clone()),
        (
            dir.root().join("guestkey.db-wal"),
            dir.root().join("guestkey.db.before-postgres-wal"),
        ),
        (
            dir.root().join("guestkey.db-shm"),
            dir.root().join("guestkey.db.before-postgres-shm"),
        ),
    ] {
        if from.exists() {
            std::fs::rename(&from, &to).map_err(|e| {
                CoreError::Internal(format!(
                    "cannot move {} aside: {e} (the data directory already uses {shown})",
                    from.display()
                ))
            })?;
        }
    }
    Ok(Moved {
        tables: copied,
        keys,
        audit_records: v.records,
        database: shown,
        kept,
    })
}

fn count(conn: &mut dyn crate::store::sql::Conn, table: &str) -> Result<u64, CoreError> {
    let rows = conn.rows(&format!("SELECT COUNT(*) FROM {table}"), &[])?;
    Ok(rows
        .first()
        .map(|r| r.get::<i64>(0))
        .transpose()?
        .unwrap_or(0)
        .max(0) as u64)
}

/// Copies one table in batches (by SQLite's rowid); how many rows.
fn copy_table(
    sqlite: &SqliteStore,
    pg: &mut dyn crate::store::sql::Conn,
    table: &str,
    cols: &[String],
) -> Result<u64, CoreError> {
    let list = cols.join(", ");
    let marks: Vec<String> = (1..=cols.len()).map(|i| format!("${i}")).collect();
    let insert = format!("INSERT INTO {table} ({list}) VALUES ({})", marks.join(", "));
    let select =
        format!("SELECT rowid, {list} FROM {table} WHERE rowid > $1 ORDER BY rowid LIMIT {BATCH}");
    let mut after = i64::MIN;
    let mut n = 0u64;
    loop {
        let rows = {
            let mut c = sqlite.begin_conn(Access::Read)?;
            c.rows(&select, &[Value::Int(after)])?
        };
        if rows.is_empty() {
            return Ok(n);
        }
        for r in &rows {
            after = r.get(0)?;
            let values: Vec<Value> = r.0[1..].to_vec();
            pg.execute(&insert, &values)?;
            n += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_of_the_schema_is_copied_or_named_as_not_copied() {
        let s = SqliteStore::in_memory().unwrap();
        let mut names: Vec<String> = s.tables().unwrap().into_iter().map(|t| t.0).collect();
        names.sort();
        let mut known: Vec<String> = COPIED
            .iter()
            .chain(NOT_COPIED)
            .map(|t| (*t).to_owned())
            .collect();
        known.sort();
        assert_eq!(names, known);
    }
}
