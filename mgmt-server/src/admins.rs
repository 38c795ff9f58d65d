//! Named admin credentials: `guestkey-server admin add|list|remove` on the
//! data directory (safe while the server runs: it reads the credentials at
//! each call). `init` makes the first one, `admin`; each further one is a
//! credential directory of its own (the admin CA signs its certificate,
//! its key is made here and written only there), recorded by name, and
//! every call made with it is audited with that name. Removing a
//! credential refuses its certificate at once; the last one is kept.
//!
//! Composes `datadir`, `ca`, `masterkey`, `store` and the audit chain, like
//! [`crate::init`].

use std::path::{Path, PathBuf};

use crate::ca::{Ca, Role};
use crate::datadir::{DataDir, create_private_dir, write_private_file, write_public_file};
use crate::domain::audit;
use crate::domain::keyring::load_matching;
use crate::domain::now_unix;
use crate::masterkey::MasterKeySource;
use crate::model::{CoreError, Name};
use crate::store::{Access, Store};

/// Days an admin certificate is valid.
const ADMIN_CERT_DAYS: i64 = 825;

/// A credential made by [`add`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Added {
    /// Its name.
    pub name: String,
    /// Its certificate's SHA-256.
    pub sha256: String,
    /// Its credential directory.
    pub dir: PathBuf,
}

fn io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> CoreError {
    let msg = format!("cannot {what} {}", path.display());
    move |e| CoreError::Internal(format!("{msg}: {e}"))
}

/// Makes the admin credential `name` in the new directory `out` and
/// records it.
pub fn add(
    dir: &DataDir,
    source: &MasterKeySource,
    store: &dyn Store,
    name: &str,
    out: &Path,
) -> Result<Added, CoreError> {
    let name = Name::parse("admin name", name)?;
    if out.exists() {
        return Err(CoreError::AlreadyExists(format!(
            "{} exists: give --out a directory that does not exist yet (the credential's key is written there)",
            out.display()
        )));
    }
    {
        let mut tx = store.begin(Access::Read)?;
        if tx.admins()?.iter().any(|(n, _, _)| n == name.as_str()) {
            return Err(CoreError::AlreadyExists(format!(
                "an admin credential named {name} exists (see `guestkey-server admin list`): pick another name, or remove it first"
            )));
        }
    }
    let ca_pem = std::fs::read_to_string(dir.admin_ca_cert())
        .map_err(io("read the admin CA certificate", &dir.admin_ca_cert()))?;
    let ca = Ca::load(Role::Admin, &ca_pem, &dir.admin_ca_key_source())
        .map_err(|e| CoreError::Internal(format!("the admin CA: {e}")))?;
    let issued = ca
        .issue(&format!("guestkey-admin-{name}"), vec![], ADMIN_CERT_DAYS)
        .map_err(|e| CoreError::Internal(format!("the admin certificate: {e}")))?;
    let key = issued.key.as_ref().map_or("", |k| k.as_str());

    // The directory first (a failure leaves no record); the record with
    // its audit entry in one transaction.
    create_private_dir(out).map_err(io("create", out))?;
    let admin_dir = dir.admin_dir();
    for file in ["ca.pem", "server.sha256", "server"] {
        let from = admin_dir.join(file);
        if let Ok(bytes) = std::fs::read(&from) {
            write_public_file(&out.join(file), &bytes).map_err(io("write", &out.join(file)))?;
        }
    }
    write_public_file(&out.join("admin.pem"), issued.cert.as_bytes())
        .map_err(io("write", &out.join("admin.pem")))?;
    write_private_file(&out.join("admin.key"), key.as_bytes())
        .map_err(io("write", &out.join("admin.key")))?;

    let recorded = (|| -> Result<(), CoreError> {
        let mut tx = store.begin(Access::Write)?;
        let expected = tx.master_key_id()?.unwrap_or_default();
        let master = load_matching(source, &expected)?;
        if tx.admins()?.iter().any(|(n, _, _)| n == name.as_str()) {
            return Err(CoreError::AlreadyExists(format!(
                "an admin credential named {name} exists"
            )));
        }
        tx.insert_admin(&issued.sha256, name.as_str(), now_unix())?;
        let audit_key = audit::ensure_key(&mut *tx, &master)?;
        audit::append(
            &mut *tx,
            &audit_key,
            "server",
            "admin.added",
            name.as_str(),
            &format!("certificate sha256 {}", issued.sha256),
        )?;
        tx.commit()?;
        Ok(())
    })();
    if let Err(e) = recorded {
        let _ = std::fs::remove_dir_all(out);
        return Err(e);
    }
    Ok(Added {
        name: name.to_string(),
        sha256: issued.sha256,
        dir: out.to_owned(),
    })
}

/// The admin credentials: (name, certificate SHA-256, created), by name.
pub fn list(store: &dyn Store) -> Result<Vec<(String, String, i64)>, CoreError> {
    Ok(store.begin(Access::Read)?.admins()?)
}

/// Removes the admin credential `name`; the last one is kept.
pub fn remove(store: &dyn Store, source: &MasterKeySource, name: &str) -> Result<(), CoreError> {
    let name = Name::parse("admin name", name)?;
    let mut tx = store.begin(Access::Write)?;
    let all = tx.admins()?;
    if !all.iter().any(|(n, _, _)| n == name.as_str()) {
        return Err(CoreError::NotFound(format!(
            "no admin credential named {name} (see `guestkey-server admin list`)"
        )));
    }
    if all.iter().all(|(n, _, _)| n == name.as_str()) {
        return Err(CoreError::FailedPrecondition(format!(
            "{name} is the only admin credential: add another first (`guestkey-server admin add NAME --out DIR`)"
        )));
    }
    let expected = tx.master_key_id()?.unwrap_or_default();
    let master = load_matching(source, &expected)?;
    let n = tx.delete_admin(name.as_str())?;
    let audit_key = audit::ensure_key(&mut *tx, &master)?;
    audit::append(
        &mut *tx,
        &audit_key,
        "server",
        "admin.removed",
        name.as_str(),
        &format!("{n} certificate(s) no longer accepted"),
    )?;
    tx.commit()?;
    Ok(())
}
