//! The master key the server holds, and finding the one that matches the
//! database: after `guestkey-server rotate-master-key` the running server
//! reloads the key from its file at its next key operation, and a rotation
//! interrupted between the database commit and the rename of
//! `master.key.next` is finished here.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use crate::masterkey::{AuditKey, MasterKey, MasterKeySource};
use crate::model::CoreError;
use crate::store::{Access, Store, Tx};

/// The staging file of a rotation: `PATH.next`.
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

/// The master key held by the server, and the audit key unwrapped under
/// it.
pub struct KeyRing {
    /// Where to reload it from after a rotation (None: never reloaded).
    source: Option<MasterKeySource>,
    held: RwLock<MasterKey>,
    /// The audit key, with the id of the master key it was unwrapped under.
    audit: Mutex<Option<(String, Arc<AuditKey>)>>,
}

impl KeyRing {
    /// Loads the key matching the database from `source`.
    pub fn load(source: MasterKeySource, store: &dyn Store) -> Result<Self, CoreError> {
        let expected = store
            .begin(Access::Read)?
            .master_key_id()?
            .unwrap_or_default();
        let key = load_matching(&source, &expected)?;
        Ok(Self {
            source: Some(source),
            held: RwLock::new(key),
            audit: Mutex::new(None),
        })
    }

    /// Makes sure the database has an audit key (an old one gets it here,
    /// with a MACed `audit.mac-enabled` record), in its own transaction.
    pub(crate) fn ensure_audit_key(&self, store: &dyn Store) -> Result<(), CoreError> {
        let mut tx = store.begin(Access::Write)?;
        let master = self.current(&mut *tx)?;
        crate::domain::audit::ensure_key(&mut *tx, &master)?;
        drop(master);
        tx.commit()?;
        Ok(())
    }

    /// A key that is never reloaded (tests).
    pub fn fixed(key: MasterKey) -> Self {
        Self {
            source: None,
            held: RwLock::new(key),
            audit: Mutex::new(None),
        }
    }

    /// The master key matching the database's current key id, as seen by
    /// `tx` (call inside the transaction that uses the key: a write
    /// transaction is exclusive, so the id cannot change before commit).
    pub(crate) fn current(
        &self,
        tx: &mut dyn Tx,
    ) -> Result<RwLockReadGuard<'_, MasterKey>, CoreError> {
        let expected = tx.master_key_id()?.unwrap_or_default();
        {
            let held = self.held.read().unwrap_or_else(|p| p.into_inner());
            if held.id() == expected {
                return Ok(held);
            }
        }
        let fresh = match &self.source {
            Some(source @ MasterKeySource::File(_)) => load_matching(source, &expected)?,
            other => {
                let from = other
                    .as_ref()
                    .map_or_else(|| "a fixed key".to_owned(), |s| s.to_string());
                return Err(CoreError::FailedPrecondition(format!(
                    "the master key was rotated (now id {expected}) and this server reads it from {from}: restart guestkey-server with the new key"
                )));
            }
        };
        tracing::info!(id = %fresh.id(), "master key reloaded after a rotation");
        *self.held.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(self.held.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The audit key of the database as seen by `tx` (made when the domain
    /// was built, see [`crate::domain::Core::new`]).
    pub(crate) fn audit_key(&self, tx: &mut dyn Tx) -> Result<Arc<AuditKey>, CoreError> {
        let master = self.current(tx)?;
        let mut cached = self.audit.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((id, key)) = cached.as_ref() {
            if id == master.id() {
                return Ok(key.clone());
            }
        }
        let w = tx.audit_key()?.ok_or_else(|| {
            CoreError::Internal("the database has no audit key: it was altered".into())
        })?;
        let key = Arc::new(
            master
                .unwrap_audit_key(&w.master_key_id, &w.wrapped)
                .map_err(|e| CoreError::Internal(e.to_string()))?,
        );
        *cached = Some((master.id().to_owned(), key.clone()));
        Ok(key)
    }
}
