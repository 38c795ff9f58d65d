//! `guestkey-server backup`: a checked copy of a SQLite server's database,
//! safe while the server runs, for `guestkey-server recover`.
//!
//! The copy is SQLite's `VACUUM INTO` (one consistent instant of the
//! database), written to a new file of mode 0600 beside the target, synced,
//! opened read-only and checked (SQLite's integrity check, this build's
//! schema, the master key id, the recovery record), and only then linked
//! to its name, which must not exist. A PostgreSQL installation is backed
//! up with PostgreSQL's own tools; this refuses it, saying so.
//!
//! The backup holds what the database holds: volume keys only as
//! ciphertext under the master key, and the recovery record. Without the
//! master key or M recovery shares it opens nothing.
//!
//! Imports: [`crate::database`], [`crate::datadir`], [`crate::store`].

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::database::Database;
use crate::datadir::{DataDir, check_owned_dir, parent_of, sync_dir};
use crate::model::CoreError;
use crate::store::sqlite::SqliteStore;
use crate::store::{Access, Store};

/// What a backup holds, as checked.
#[derive(Debug, Clone)]
pub struct BackupReport {
    /// The backup file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// Volume keys in it (every generation kept).
    pub keys: usize,
    /// The master key they are wrapped under.
    pub master_key_id: String,
    /// The recovery split it records: id, M, N; none if shares were never
    /// split.
    pub split: Option<(String, u8, u8)>,
}

fn failed(msg: impl Into<String>) -> CoreError {
    CoreError::FailedPrecondition(msg.into())
}

fn io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> CoreError {
    let msg = format!("cannot {what} {}", path.display());
    move |e| CoreError::Internal(format!("{msg}: {e}"))
}

/// The directory the backup goes in: it must be a real directory of ours,
/// writable by no one else (SQLite reopens the new file by its name, so no
/// one else may swap it in between).
fn check_parent(out: &Path) -> Result<PathBuf, CoreError> {
    let parent = parent_of(out).to_path_buf();
    check_owned_dir(&parent).map_err(|e| failed(format!("{e} (--out {})", out.display())))?;
    Ok(parent)
}

/// Backs up the data directory's SQLite database into `out` (a new file).
pub fn backup(dir: &DataDir, out: &Path) -> Result<BackupReport, CoreError> {
    let db = match Database::of(dir, None)? {
        Database::Sqlite(p) => p,
        Database::Postgres(_) => {
            return Err(failed(format!(
                "{} uses PostgreSQL: back it up with PostgreSQL's tools (pg_dump, a replica); `guestkey-server recover --database URL` rebuilds the data directory from it",
                dir.root().display()
            )));
        }
    };
    if !db.is_file() {
        return Err(failed(format!(
            "no database at {}: give the --data-dir of a server",
            db.display()
        )));
    }
    if out.file_name().is_none() {
        return Err(failed(format!(
            "{} names no file: give --out FILE",
            out.display()
        )));
    }
    match std::fs::symlink_metadata(out) {
        Ok(_) => {
            return Err(failed(format!(
                "{} exists: give a new file for the backup (nothing is overwritten)",
                out.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("look at", out)(e)),
    }
    let parent = check_parent(out)?;
    let tmp = parent.join(format!(
        ".{}.backup-{}",
        out.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let result = copy_and_check(&db, &tmp).and_then(|mut report| {
        // A link cannot replace a file: a name taken since is refused.
        std::fs::hard_link(&tmp, out).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                failed(format!(
                    "{} appeared while the backup was made: nothing is overwritten",
                    out.display()
                ))
            } else {
                io("name the backup", out)(e)
            }
        })?;
        sync_dir(&parent).map_err(io("sync", &parent))?;
        report.path = out.to_path_buf();
        Ok(report)
    });
    let _ = std::fs::remove_file(&tmp);
    result
}

fn copy_and_check(db: &Path, tmp: &Path) -> Result<BackupReport, CoreError> {
    // An empty file of mode 0600 that VACUUM INTO fills (and keeps).
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(tmp)
        .map_err(io("create", tmp))?;
    let live = SqliteStore::open_read_only(db)?;
    live.backup_into(tmp)?;
    drop(live);
    let file = std::fs::File::open(tmp).map_err(io("open", tmp))?;
    file.sync_all().map_err(io("sync", tmp))?;
    let bytes = file.metadata().map_err(io("read", tmp))?.len();

    let copy = SqliteStore::open_read_only(tmp)?;
    let problems = copy.integrity_problems()?;
    if !problems.is_empty() {
        return Err(CoreError::Internal(format!(
            "the copy fails SQLite's integrity check ({}): the database {} may be damaged; nothing was written",
            problems.join("; "),
            db.display()
        )));
    }
    let mut tx = copy.begin(Access::Read)?;
    let Some(master_key_id) = tx.master_key_id()? else {
        return Err(failed(format!(
            "{} records no master key: it is not a guestkey server's database",
            db.display()
        )));
    };
    let keys = tx.all_volume_keys()?.len();
    let split = match tx.recovery()? {
        Some(r) if r.master_key_id != master_key_id => {
            return Err(CoreError::Internal(format!(
                "the recovery record holds master key {}, the database {master_key_id}: run `guestkey-server recovery refresh`, then back up again",
                r.master_key_id
            )));
        }
        Some(r) => Some((r.split_id, r.threshold, r.shares)),
        None => None,
    };
    Ok(BackupReport {
        path: tmp.to_path_buf(),
        bytes,
        keys,
        master_key_id,
        split,
    })
}
