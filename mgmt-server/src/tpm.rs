//! The server's keys sealed to its TPM: `init --master-key-source tpm`,
//! `tpm approve`, `tpm status` and `reseal`.
//!
//! Sealed are the master key (it wraps every volume key) and the three CA
//! keys; they live in `DATA_DIR/tpm/` (see [`crate::datadir`]) and open only
//! on this machine's TPM, while its PCRs have values the PCR authority
//! approved (TPM2_PolicyAuthorize, see `guestkey_protect::tpm`). The
//! authority's private key is a file the operator keeps off this machine;
//! `tpm approve` signs the PCR values of an update with it, in advance.
//! The mechanics (and a reseal's crash safety) are
//! `guestkey_protect::tpm::KeySet`'s; here are the server's keys, its lock
//! and its audit record.
//!
//! Composition like [`crate::roles`]: imports the leaf modules, the SQLite
//! store and the domain's audit chain.

use std::path::Path;

pub use guestkey_protect::tpm::{DEFAULT_TCTI, ResealReport, ResealTo, TpmTarget};
use guestkey_protect::tpm::{KeyEntry, KeySet, SealedStatus, TpmSite};
use guestkey_protect::{Encoding, ProtectedKey};

use crate::datadir::DataDir;
use crate::domain::{KeyRing, audit};
use crate::model::CoreError;
use crate::store::Access;

/// The keys of a data directory.
pub const KEYS: &[KeyEntry] = &[
    KeyEntry {
        name: "master.key",
        file: "master.key",
        encoding: Encoding::Base64,
    },
    KeyEntry {
        name: "ca.key",
        file: "ca/ca.key",
        encoding: Encoding::Raw,
    },
    KeyEntry {
        name: "server-ca.key",
        file: "ca/server-ca.key",
        encoding: Encoding::Raw,
    },
    KeyEntry {
        name: "admin-ca.key",
        file: "ca/admin-ca.key",
        encoding: Encoding::Raw,
    },
];

/// The command that approves the current PCR values of `data_dir`.
pub fn approve_hint(data_dir: &Path, authority_key: &Path) -> String {
    format!(
        "guestkey-server tpm approve --data-dir {} --authority-key {} --current",
        data_dir.display(),
        authority_key.display()
    )
}

/// The key set of the data directory `root`.
pub fn keyset(root: &Path) -> KeySet {
    KeySet::new(root, KEYS, approve_hint)
}

fn tpm_err(e: guestkey_protect::tpm::TpmError) -> CoreError {
    CoreError::FailedPrecondition(e.to_string())
}

/// Makes `tpm_dir` for a new data directory whose final name is
/// `data_dir`, with an approval of the current PCR values, and saves its
/// settings: the keys sealed into it afterwards go to the TPM.
pub fn prepare_site(
    tpm_dir: &Path,
    data_dir: &Path,
    target: &TpmTarget,
) -> Result<TpmSite, CoreError> {
    let site = keyset(data_dir)
        .prepare_site(tpm_dir, target)
        .map_err(tpm_err)?;
    site.save(tpm_dir).map_err(tpm_err)?;
    Ok(site)
}

/// A new master key from the TPM's and the OS's random bytes.
pub fn new_master_key(tcti: &str) -> Result<ProtectedKey, CoreError> {
    guestkey_protect::tpm::keyset::new_key(tcti, 32).map_err(tpm_err)
}

/// The sealed master key's status.
pub fn status(data_dir: &Path) -> Result<SealedStatus, CoreError> {
    keyset(data_dir).status(&KEYS[0]).map_err(tpm_err)
}

/// Moves every key of the data directory to `to`, with an audit record;
/// the server must be stopped. Nothing is lost at any instant.
pub fn reseal(data_dir: &Path, to: &ResealTo) -> Result<ResealReport, CoreError> {
    let dir = DataDir::new(data_dir);
    if !dir.db().exists() && !dir.database_file().exists() {
        return Err(CoreError::FailedPrecondition(format!(
            "{} is not a guestkey data directory (no guestkey.db or database file)",
            data_dir.display()
        )));
    }
    let _lock = dir
        .hold("stop it first: reseal moves the keys it holds")
        .map_err(|e| CoreError::FailedPrecondition(e.to_string()))?;
    let set = keyset(data_dir);
    if !set
        .protector(&KEYS[0])
        .exists()
        .map_err(|e| tpm_err(e.into()))?
    {
        return Err(CoreError::FailedPrecondition(format!(
            "{} keeps its master key elsewhere (env: or prompt): reseal moves only keys kept in the data directory",
            data_dir.display()
        )));
    }
    let r = set.reseal(to).map_err(tpm_err)?;
    let store = crate::database::Database::of(&dir, None)?.open()?;
    let ring = KeyRing::load(dir.default_master_key_source(), store.as_ref())?;
    ring.ensure_audit_key(store.as_ref())?;
    let mut tx = store.begin(Access::Write)?;
    let key = ring.audit_key(&mut *tx)?;
    audit::append(
        &mut *tx,
        &key,
        "server",
        "server.keys-resealed",
        "",
        &format!("{} moved from {} to {}", r.keys.join(", "), r.from, r.to),
    )?;
    tx.commit()?;
    Ok(r)
}
