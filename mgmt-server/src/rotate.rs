//! Master key rotation without downtime.
//!
//! `guestkey-server rotate-master-key` works on the database while the
//! server runs:
//! 1. the new key is written to `master.key.next` (0600, synced);
//! 2. one transaction re-wraps every volume key under the new key and
//!    records the new key id (SQLite serialises it with the server's own
//!    writes, and WAL readers keep working);
//! 3. `master.key.next` is renamed over `master.key`.
//!
//! A running server notices the new key id at its next key operation and
//! reloads the key from its file. A crash between 2 and 3 is finished at
//! the next start: the `.next` file is the one matching the database.
//! With an `env:` or `prompt` source the server cannot reload by itself:
//! it refuses key operations, saying to restart with the new key.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, TransactionBehavior, params};

use crate::audit;
use crate::core::CoreError;
use crate::db;
use crate::masterkey::{MasterKey, MasterKeySource};

/// The staging file of a rotation.
pub fn next_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".next");
    PathBuf::from(p)
}

/// Loads the master key that matches the database's key id `expected`,
/// finishing an interrupted rotation if needed.
pub fn load_matching(source: &MasterKeySource, expected: &str) -> Result<MasterKey, CoreError> {
    let key = MasterKey::load(source)?;
    if key.id() == expected {
        return Ok(key);
    }
    if let MasterKeySource::File(path) = source {
        let next = next_path(path);
        if next.exists() {
            let staged = MasterKey::load(&MasterKeySource::File(next.clone()))?;
            if staged.id() == expected {
                std::fs::rename(&next, path).map_err(|e| {
                    CoreError::Internal(format!(
                        "cannot finish the master key rotation ({} -> {}): {e}",
                        next.display(),
                        path.display()
                    ))
                })?;
                tracing::info!(id = %staged.id(), "finished an interrupted master key rotation");
                return Ok(staged);
            }
        }
    }
    Err(CoreError::Denied(format!(
        "the master key from {source} (id {}) is not this data directory's master key (id {expected}): check --master-key-source",
        key.id()
    )))
}

/// What a rotation did.
#[derive(Debug)]
pub struct Rotation {
    /// Old key id.
    pub old_id: String,
    /// New key id.
    pub new_id: String,
    /// Volume keys re-wrapped.
    pub rewrapped: u64,
}

/// Rotates the master key of the database at `db_path`. `source` holds the
/// current key; the new key goes to `new_source` (for a file: created, must
/// not exist) or, by default, replaces the current key file.
pub fn rotate(
    db_path: &Path,
    source: &MasterKeySource,
    new_source: Option<&MasterKeySource>,
) -> Result<Rotation, CoreError> {
    let mut conn: Connection = db::open(db_path)?;
    let expected = db::meta_get(&conn, "master_key_id")?.unwrap_or_default();
    let old = load_matching(source, &expected)?;

    // 1. The new key, staged where the server will find it.
    let (new, finish): (MasterKey, Option<(PathBuf, PathBuf)>) = match (new_source, source) {
        (None, MasterKeySource::File(path)) => {
            let staged = next_path(path);
            let _ = std::fs::remove_file(&staged);
            let key = MasterKey::generate()?;
            key.write_new_file(&staged)?;
            (key, Some((staged, path.clone())))
        }
        (None, _) => {
            return Err(CoreError::FailedPrecondition(format!(
                "the current master key comes from {source}: say where the new one comes from with --new-master-key-source (file:PATH, env:VAR or prompt)"
            )));
        }
        (Some(MasterKeySource::File(p)), _) if !p.exists() => {
            let key = MasterKey::generate()?;
            key.write_new_file(p)?;
            (key, None)
        }
        (Some(s), _) => (MasterKey::load(s)?, None),
    };
    if new.id() == old.id() {
        return Err(CoreError::FailedPrecondition(
            "the new master key is the current one".into(),
        ));
    }

    // 2. Re-wrap everything in one transaction.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let rows: Vec<(String, i64, String, Vec<u8>)> = {
        let mut stmt =
            tx.prepare("SELECT volume_id, generation, master_key_id, wrapped FROM volume_keys")?;
        let it = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
        it.collect::<Result<_, _>>()?
    };
    for (volume, generation, mk_id, wrapped) in &rows {
        let key = old
            .unwrap_key(volume, *generation as u64, mk_id, wrapped)
            .map_err(|e| CoreError::Internal(e.to_string()))?;
        let rewrapped = new.wrap(volume, *generation as u64, &key);
        tx.execute(
            "UPDATE volume_keys SET master_key_id = ?1, wrapped = ?2 WHERE volume_id = ?3 AND generation = ?4",
            params![new.id(), rewrapped, volume, generation],
        )?;
    }
    db::meta_set(&tx, "master_key_id", new.id())?;
    audit::append(
        &tx,
        "server",
        "master-key.rotated",
        "",
        &format!(
            "{} -> {}, {} keys re-wrapped",
            old.id(),
            new.id(),
            rows.len()
        ),
    )?;
    tx.commit()?;

    // 3. The new key file takes the old one's place.
    if let Some((staged, path)) = finish {
        std::fs::rename(&staged, &path)
            .map_err(|e| CoreError::Internal(format!("keys re-wrapped, but cannot move {} to {}: {e} (the server finishes this at its next start)", staged.display(), path.display())))?;
        if let Some(dir) = path.parent() {
            let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
        }
    }
    Ok(Rotation {
        old_id: old.id().to_owned(),
        new_id: new.id().to_owned(),
        rewrapped: rows.len() as u64,
    })
}
