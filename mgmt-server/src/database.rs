//! Which database a data directory's server uses, and opening it.
//!
//! SQLite, `DATA_DIR/guestkey.db`, is the default. `init --database
//! postgres://...` records a PostgreSQL URL in `DATA_DIR/database` (0600:
//! a URL may carry a password); `run --database URL` or `database = URL`
//! in the config file overrides what the data directory records (a moved
//! database, a new password). Every program of the server opens its store
//! here.

use std::sync::Arc;

use crate::datadir::DataDir;
use crate::model::CoreError;
use crate::store::Store;
use crate::store::postgres::{PostgresStore, shown_url};
use crate::store::sqlite::SqliteStore;

/// Connections one server process keeps to PostgreSQL at most.
pub const MAX_CONNECTIONS: usize = 16;

/// A database of the server (`Debug` as [`Database::shown`]: no password).
#[derive(Clone, PartialEq, Eq)]
pub enum Database {
    /// The data directory's SQLite file.
    Sqlite(std::path::PathBuf),
    /// A PostgreSQL database, by URL.
    Postgres(String),
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown())
    }
}

impl Database {
    /// Reads a `--database` value: a `postgres://` (or `postgresql://`)
    /// URL, or `sqlite` for the data directory's own file.
    pub fn parse(text: &str, dir: &DataDir) -> Result<Self, CoreError> {
        let t = text.trim();
        if t.starts_with("postgres://") || t.starts_with("postgresql://") {
            Ok(Database::Postgres(t.to_owned()))
        } else if t == "sqlite" {
            Ok(Database::Sqlite(dir.db()))
        } else {
            Err(CoreError::Invalid(crate::model::names::InvalidInput {
                what: "database",
                value: shown_url(t),
                why: "give postgres://USER@HOST:PORT/DATABASE, or sqlite for DATA_DIR/guestkey.db"
                    .into(),
            }))
        }
    }

    /// The database `dir` records (`DATA_DIR/database`), else its SQLite
    /// file; `given` (a flag or the config file) wins.
    pub fn of(dir: &DataDir, given: Option<&str>) -> Result<Self, CoreError> {
        if let Some(text) = given {
            return Self::parse(text, dir);
        }
        let file = dir.database_file();
        match std::fs::read_to_string(&file) {
            Ok(text) => Self::parse(&text, dir)
                .map_err(|e| CoreError::Internal(format!("{}: {e}", file.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Database::Sqlite(dir.db())),
            Err(e) => Err(CoreError::Internal(format!(
                "cannot read {}: {e}",
                file.display()
            ))),
        }
    }

    /// How `status` and messages name it (never a password).
    pub fn shown(&self) -> String {
        match self {
            Database::Sqlite(p) => format!("sqlite {}", p.display()),
            Database::Postgres(url) => format!("postgresql {}", shown_url(url)),
        }
    }

    /// Opens it (applying pending schema migrations).
    pub fn open(&self) -> Result<Arc<dyn Store>, CoreError> {
        Ok(match self {
            Database::Sqlite(p) => Arc::new(SqliteStore::open(p)?),
            Database::Postgres(url) => Arc::new(PostgresStore::open(url, MAX_CONNECTIONS)?),
        })
    }
}

/// What `guestkey-server status` shows: the database, the replicas on it
/// and which one leads.
#[derive(Debug, Clone)]
pub struct Status {
    /// The database (no password).
    pub database: String,
    /// The database's clock now (ms).
    pub now_ms: i64,
    /// The leader's lease, if one was ever taken.
    pub lease: Option<crate::store::Lease>,
    /// The replicas that run (or stopped without saying so), by start.
    pub replicas: Vec<crate::store::Replica>,
}

impl Status {
    /// Reads it from `dir`'s database (or `given`).
    pub fn read(dir: &DataDir, given: Option<&str>) -> Result<Self, CoreError> {
        let db = Database::of(dir, given)?;
        if let Database::Sqlite(path) = &db {
            if !path.exists() {
                return Err(CoreError::FailedPrecondition(format!(
                    "{} is not a guestkey data directory (no guestkey.db or database file): give the --data-dir that `guestkey-server init` made",
                    dir.root().display()
                )));
            }
        }
        let store = db.open()?;
        let mut tx = store.begin(crate::store::Access::Read)?;
        Ok(Self {
            database: db.shown(),
            now_ms: tx.db_now_ms()?,
            lease: tx.lease()?,
            replicas: tx.replicas()?,
        })
    }

    /// The leader now: its lease, if it has not lapsed.
    pub fn leader(&self) -> Option<&crate::store::Lease> {
        self.lease.as_ref().filter(|l| l.expires_ms > self.now_ms)
    }

    /// As JSON (`--json`).
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "database": self.database,
            "leader": self.leader().map(|l| serde_json::json!({
                "replica": l.holder,
                "fence": l.fence,
                "since_unix_ms": l.since_ms,
                "lease_until_unix_ms": l.expires_ms,
            })),
            "replicas": self.replicas.iter().map(|r| serde_json::json!({
                "id": r.id,
                "address": r.address,
                "url": r.url,
                "host": r.host,
                "pid": r.pid,
                "version": r.version,
                "started_unix_ms": r.started_ms,
                "seen_unix_ms": r.seen_ms,
                "leads": self.leader().is_some_and(|l| l.holder == r.id),
            })).collect::<Vec<_>>(),
        })
    }

    /// As text for a terminal.
    pub fn text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(out, "database: {}", self.database);
        match (self.leader(), &self.lease) {
            (Some(l), _) => {
                let at = self
                    .replicas
                    .iter()
                    .find(|r| r.id == l.holder)
                    .map_or_else(String::new, |r| {
                        format!(" on {} ({}, pid {})", r.host, r.address, r.pid)
                    });
                let _ = writeln!(
                    out,
                    "leader:   {}{at}, since {} (fence {}); lease renewed until {}",
                    l.holder,
                    utc(l.since_ms),
                    l.fence,
                    utc(l.expires_ms)
                );
            }
            (None, Some(l)) => {
                let _ = writeln!(
                    out,
                    "leader:   none: the lease of {} (fence {}) lapsed at {}; a running replica takes it within its renewal time",
                    l.holder,
                    l.fence,
                    utc(l.expires_ms)
                );
            }
            (None, None) => {
                let _ = writeln!(out, "leader:   none yet (no replica has run)");
            }
        }
        let mut t = comfy_table::Table::new();
        t.load_preset(comfy_table::presets::NOTHING)
            .set_content_arrangement(comfy_table::ContentArrangement::Disabled)
            .set_header([
                "REPLICA",
                "ADDRESS",
                "URL FOR HOSTS",
                "HOST",
                "PID",
                "VERSION",
                "STARTED",
                "LAST SEEN",
                "LEADS",
            ]);
        for r in &self.replicas {
            let ago = (self.now_ms - r.seen_ms).max(0) / 1000;
            t.add_row([
                r.id.clone(),
                r.address.clone(),
                if r.url.is_empty() {
                    "-".into()
                } else {
                    r.url.clone()
                },
                r.host.clone(),
                r.pid.to_string(),
                r.version.clone(),
                utc(r.started_ms),
                format!("{ago} s ago"),
                if self.leader().is_some_and(|l| l.holder == r.id) {
                    "yes".into()
                } else {
                    String::new()
                },
            ]);
        }
        let _ = writeln!(out, "replicas: {}", self.replicas.len());
        if !self.replicas.is_empty() {
            let _ = writeln!(out, "{t}");
        }
        out
    }
}

/// `ms` since the Unix epoch as `2026-12-01 23:20:01Z`.
fn utc(ms: i64) -> String {
    let fmt = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]Z");
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&fmt).ok())
        .unwrap_or_else(|| format!("{ms} ms"))
}

/// What `add-replica` made.
#[derive(Debug, Clone)]
pub struct ReplicaCopy {
    /// Files copied.
    pub files: usize,
    /// The database the copy uses.
    pub database: String,
}

/// `guestkey-server add-replica`: a data directory for another replica of
/// `dir`'s server, at `to` (absent or empty): the same CAs, server
/// certificate (hosts pin it), admin credential and master key, and the
/// same PostgreSQL database. Not copied: the running server's lock and its
/// audit checkpoints (each replica keeps its own). Refused for a SQLite
/// data directory (replicas share PostgreSQL) and for keys sealed to this
/// machine's TPM (they would not unseal elsewhere). `to` holds keys: move
/// it to the new machine as one would the original (mode 0700 kept).
pub fn add_replica(dir: &DataDir, to: &std::path::Path) -> Result<ReplicaCopy, CoreError> {
    let db = Database::of(dir, None)?;
    let Database::Postgres(_) = &db else {
        return Err(CoreError::FailedPrecondition(format!(
            "{} keeps its state in SQLite ({}), which one server process owns: replicas share a PostgreSQL database (move it there with `guestkey-server move-to-postgres` first)",
            dir.root().display(),
            db.shown()
        )));
    };
    if dir.is_tpm() {
        return Err(CoreError::FailedPrecondition(format!(
            "{} keeps its master key and CA keys sealed to this machine's TPM, which another machine cannot unseal: `guestkey-server reseal --to-files` here, add the replica, then reseal each to its own TPM",
            dir.root().display()
        )));
    }
    if !dir.database_file().exists() {
        return Err(CoreError::FailedPrecondition(format!(
            "{} is not a guestkey data directory",
            dir.root().display()
        )));
    }
    if to.exists()
        && std::fs::read_dir(to)
            .map_err(|e| CoreError::Internal(format!("cannot read {}: {e}", to.display())))?
            .next()
            .is_some()
    {
        return Err(CoreError::AlreadyExists(format!(
            "{} exists and is not empty: give a new directory for the replica",
            to.display()
        )));
    }
    let skip = [dir.lock(), dir.audit_checkpoints()];
    let mut files = 0;
    let result = copy_tree(dir.root(), to, &skip, &mut files);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(to);
    }
    result?;
    Ok(ReplicaCopy {
        files,
        database: db.shown(),
    })
}

/// Copies regular files and folders (never following links), modes kept.
fn copy_tree(
    from: &std::path::Path,
    to: &std::path::Path,
    skip: &[std::path::PathBuf],
    files: &mut usize,
) -> Result<(), CoreError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |what: &str, p: &std::path::Path, e: std::io::Error| {
        CoreError::Internal(format!("cannot {what} {}: {e}", p.display()))
    };
    crate::datadir::create_private_dir(to).map_err(|e| io("create", to, e))?;
    for entry in std::fs::read_dir(from).map_err(|e| io("read", from, e))? {
        let entry = entry.map_err(|e| io("read", from, e))?;
        let path = entry.path();
        if skip.contains(&path) {
            continue;
        }
        let target = to.join(entry.file_name());
        let meta = std::fs::symlink_metadata(&path).map_err(|e| io("read", &path, e))?;
        if meta.is_dir() {
            copy_tree(&path, &target, skip, files)?;
        } else if meta.is_file() {
            let data =
                zeroize::Zeroizing::new(std::fs::read(&path).map_err(|e| io("read", &path, e))?);
            let mode = meta.permissions().mode() & 0o777;
            let mut f = std::fs::OpenOptions::new();
            f.write(true).create_new(true);
            std::os::unix::fs::OpenOptionsExt::mode(&mut f, mode);
            let mut out = f.open(&target).map_err(|e| io("create", &target, e))?;
            std::io::Write::write_all(&mut out, &data).map_err(|e| io("write", &target, e))?;
            out.sync_all().map_err(|e| io("write", &target, e))?;
            *files += 1;
        }
        // Links and special files are not part of a data directory.
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_url_shows_no_password_in_debug_output() {
        let url = "postgres://gk:s3cret@db:5432/gk";
        let d = Database::Postgres(url.into());
        let u = crate::config::DatabaseUrl(url.into());
        for shown in [format!("{d:?}"), format!("{u:?}"), d.shown()] {
            assert!(!shown.contains("s3cret"), "{shown}");
        }
    }
}
