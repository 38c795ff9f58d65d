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

/// A database of the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// The data directory's SQLite file.
    Sqlite(std::path::PathBuf),
    /// A PostgreSQL database, by URL.
    Postgres(String),
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
