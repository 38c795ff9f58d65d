//! Master key rotation without downtime.
//!
//! `guestkey-server rotate-master-key` works on the database while the
//! server runs:
//! 1. the new key is written to `master.key.next` (0600, synced) by the
//!    key's protector;
//! 2. one transaction re-wraps every volume key under the new key and
//!    records the new key id (the store serialises it with the server's own
//!    writes; readers keep working);
//! 3. `master.key.next` is renamed over `master.key`.
//!
//! A running server notices the new key id at its next key operation and
//! reloads the key from its file ([`super::keyring`]). A crash between 2
//! and 3 is finished at the next start: the `.next` file is the one
//! matching the database. With an `env:` or `prompt` source the server
//! cannot reload by itself: it refuses key operations, saying to restart
//! with the new key.

use std::path::PathBuf;

use crate::domain::audit;
use crate::domain::keyring::{load_matching, next_path};
use crate::masterkey::{MasterKey, MasterKeySource};
use crate::model::CoreError;
use crate::store::{Access, Store, WrappedKey};

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

/// Rotates the master key of `store`. `source` holds the current key; the
/// new key goes to `new_source` (for a file: created, must not exist) or,
/// by default, replaces the current key file.
pub fn rotate(
    store: &dyn Store,
    source: &MasterKeySource,
    new_source: Option<&MasterKeySource>,
) -> Result<Rotation, CoreError> {
    let expected = store
        .begin(Access::Read)?
        .master_key_id()?
        .unwrap_or_default();
    let old = load_matching(source, &expected)?;

    // 1. The new key, staged where the server will find it.
    let (new, finish): (MasterKey, Option<(PathBuf, PathBuf)>) = match (new_source, source) {
        (None, MasterKeySource::File(path)) => {
            let staged = next_path(path);
            let _ = std::fs::remove_file(&staged);
            let key = MasterKey::generate()?;
            key.store_new(&MasterKeySource::File(staged.clone()))?;
            (key, Some((staged, path.clone())))
        }
        (None, _) => {
            return Err(CoreError::FailedPrecondition(format!(
                "the current master key comes from {source}: say where the new one comes from with --new-master-key-source (file:PATH, env:VAR or prompt)"
            )));
        }
        (Some(s @ MasterKeySource::File(p)), _) if !p.exists() => {
            let key = MasterKey::generate()?;
            key.store_new(s)?;
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
    let mut tx = store.begin(Access::Write)?;
    let rows = tx.all_volume_keys()?;
    for (volume, generation, key) in &rows {
        let clear = old
            .unwrap_key(volume, *generation, &key.master_key_id, &key.wrapped)
            .map_err(|e| CoreError::Internal(e.to_string()))?;
        let rewrapped = WrappedKey {
            master_key_id: new.id().to_owned(),
            wrapped: new.wrap(volume, *generation, &clear),
        };
        tx.rewrap_volume_key(volume, *generation, &rewrapped)?;
    }
    // A verifier's halves of split keys, under the name they are bound to.
    let halves = tx.all_key_halves()?;
    for (volume, generation, key) in &halves {
        let name = crate::domain::halves::wrap_name(volume);
        let clear = old
            .unwrap_key(&name, *generation, &key.master_key_id, &key.wrapped)
            .map_err(|e| CoreError::Internal(e.to_string()))?;
        let rewrapped = WrappedKey {
            master_key_id: new.id().to_owned(),
            wrapped: new.wrap(&name, *generation, &clear),
        };
        tx.rewrap_key_half(volume, *generation, &rewrapped)?;
    }
    // The audit key stays the same; it is re-wrapped like the volume keys
    // (an old database gets one here, under the old key first).
    let audit_key = audit::ensure_key(&mut *tx, &old)?;
    let rewrapped = WrappedKey {
        master_key_id: new.id().to_owned(),
        wrapped: new.wrap_audit_key(&audit_key),
    };
    tx.put_audit_key(&rewrapped, crate::domain::now_unix())?;
    // The recovery record follows the key: the custodians' shares keep
    // recovering it.
    let recovery = tx.recovery()?;
    if let Some(rec) = &recovery {
        tx.put_recovery(&crate::domain::recovery::rotated(rec, &old, &new)?)?;
    }
    tx.set_master_key_id(new.id())?;
    audit::append(
        &mut *tx,
        &audit_key,
        "server",
        "master-key.rotated",
        "",
        &format!(
            "{} -> {}, {} keys re-wrapped{}",
            old.id(),
            new.id(),
            rows.len() + halves.len(),
            if recovery.is_some() {
                ", the recovery record re-sealed"
            } else {
                ""
            }
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
        rewrapped: (rows.len() + halves.len()) as u64,
    })
}
