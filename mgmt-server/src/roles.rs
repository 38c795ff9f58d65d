//! One CA per role in a data directory: the server CA and its one
//! certificate (the server's), the admin CA and the admin credential
//! (made by `init`), and `guestkey-server migrate-roles`, which gives a data
//! directory made before roles (one CA signed the server, admin and host
//! certificates alike) the same.
//!
//! The migration keeps every key: the database, the master key and the CA
//! that signed the hosts' certificates (`ca/ca.pem`, from then on the hosts
//! CA) stay as they are. It makes the server and admin CAs, a new server
//! certificate (same names) and a new admin certificate, rewrites the
//! admin credential (`admin/ca.pem` = the server CA, `admin/server.sha256`
//! = the pin), makes the new admin certificate the only one that
//! authenticates, and audits it. It is resumable: everything new is first
//! written to `DATA_DIR/.roles-migration/`, the database is changed in one
//! transaction, then the files are renamed into place, `ca/server-ca.pem`
//! last (its presence means "migrated"); a run that stopped anywhere is
//! finished by running it again. It holds the data directory's lock, so it
//! never runs beside a server.
//!
//! Composition like [`crate::init`]: imports the leaf modules, the SQLite
//! store and the domain's key ring and audit chain. Used by `init` and by
//! `guestkey-server`.

use std::path::{Path, PathBuf};

use crate::ca::{Ca, LEAF_VALIDITY_DAYS, Role, cert_sha256, subject_alt_names};
use crate::datadir::{DataDir, create_private_dir, write_private_file, write_public_file};
use crate::domain::{KeyRing, audit, now_unix};
use crate::masterkey::MasterKeySource;
use crate::model::CoreError;
use crate::store::Access;

/// The server's names when `init` is given none.
pub const DEFAULT_SANS: [&str; 2] = ["localhost", "127.0.0.1"];

/// Hashes of what [`write_role_files`] made.
pub struct RoleFiles {
    /// The server's certificate.
    pub server_sha256: String,
    /// The admin certificate.
    pub admin_sha256: String,
}

fn io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> CoreError {
    let msg = format!("cannot {what} {}", path.display());
    move |e| CoreError::Internal(format!("{msg}: {e}"))
}

/// Makes the server CA and the admin CA (their keys through their
/// protectors), the server certificate for `sans` and the admin credential's
/// certificate files (`admin/ca.pem`, `admin.pem`, `admin.key`,
/// `server.sha256`) in `dir`, whose `ca/`, `tls/` and `admin/` exist. Never
/// overwrites.
pub(crate) fn write_role_files(
    dir: &DataDir,
    label: &str,
    sans: Vec<String>,
) -> Result<RoleFiles, CoreError> {
    let (server_ca, server_ca_key) = Ca::generate(Role::Server, label)?;
    write_public_file(&dir.server_ca_cert(), server_ca.cert_pem().as_bytes())
        .map_err(io("write", &dir.server_ca_cert()))?;
    Ca::store_key(&server_ca_key, &dir.server_ca_key_source())?;
    let (admin_ca, admin_ca_key) = Ca::generate(Role::Admin, label)?;
    write_public_file(&dir.admin_ca_cert(), admin_ca.cert_pem().as_bytes())
        .map_err(io("write", &dir.admin_ca_cert()))?;
    Ca::store_key(&admin_ca_key, &dir.admin_ca_key_source())?;

    let server = server_ca.issue("guestkey-server", sans, LEAF_VALIDITY_DAYS)?;
    write_public_file(&dir.server_cert(), server.cert.as_bytes())
        .map_err(io("write", &dir.server_cert()))?;
    let server_key = server.key.as_ref().map_or("", |k| k.as_str());
    write_private_file(&dir.server_key(), server_key.as_bytes())
        .map_err(io("write", &dir.server_key()))?;

    let admin = admin_ca.issue("guestkey-admin", vec![], LEAF_VALIDITY_DAYS)?;
    let admin_dir = dir.admin_dir();
    // The admin credential trusts the server CA only, and pins the server.
    write_public_file(&admin_dir.join("ca.pem"), server_ca.cert_pem().as_bytes())
        .map_err(io("write", &admin_dir.join("ca.pem")))?;
    write_public_file(
        &dir.admin_server_pin(),
        format!("{}\n", server.sha256).as_bytes(),
    )
    .map_err(io("write", &dir.admin_server_pin()))?;
    write_public_file(&admin_dir.join("admin.pem"), admin.cert.as_bytes())
        .map_err(io("write", &admin_dir.join("admin.pem")))?;
    let admin_key = admin.key.as_ref().map_or("", |k| k.as_str());
    write_private_file(&admin_dir.join("admin.key"), admin_key.as_bytes())
        .map_err(io("write", &admin_dir.join("admin.key")))?;
    Ok(RoleFiles {
        server_sha256: server.sha256,
        admin_sha256: admin.sha256,
    })
}

/// What a data directory made before roles is told at `run`.
pub fn before_roles_refusal(dir: &DataDir) -> CoreError {
    CoreError::FailedPrecondition(format!(
        "{} was made before certificates had roles (one CA signs the server, admin and host certificates, so a host's key pair could pass as the server): stop here and run `guestkey-server migrate-roles --data-dir {}` once (it keeps every key), then start the server and run `guestkeyd trust-server` on each host",
        dir.root().display(),
        dir.root().display()
    ))
}

/// What `migrate-roles` needs.
pub struct MigrateOptions {
    /// The data directory.
    pub data_dir: PathBuf,
    /// Where the master key is (for the audit record); default
    /// `file:DATA_DIR/master.key`.
    pub master_key_source: Option<MasterKeySource>,
}

/// What `migrate-roles` did.
pub struct MigrateReport {
    /// SHA-256 of the new server certificate (what hosts now pin).
    pub server_sha256: String,
    /// SHA-256 of the new admin certificate.
    pub admin_sha256: String,
    /// The server CA certificate hosts need (`guestkeyd trust-server --ca-file`).
    pub server_ca: PathBuf,
    /// Admin certificates that no longer authenticate.
    pub removed_admins: usize,
}

/// The files of a migration, in the order they are renamed into place:
/// `ca/server-ca.pem` last, because its presence means "migrated".
const INSTALL: [&str; 10] = [
    "ca/admin-ca.key",
    "ca/admin-ca.pem",
    "ca/server-ca.key",
    "tls/server.key",
    "tls/server.pem",
    "admin/admin.key",
    "admin/admin.pem",
    "admin/ca.pem",
    "admin/server.sha256",
    "ca/server-ca.pem",
];

/// Gives a data directory made before roles one CA per role (see the
/// module header). Refuses a directory that already has them, and one a
/// running server holds.
pub fn migrate_roles(opts: &MigrateOptions) -> Result<MigrateReport, CoreError> {
    let dir = DataDir::new(&opts.data_dir);
    if !dir.db().exists() && !dir.database_file().exists() {
        return Err(CoreError::FailedPrecondition(format!(
            "{} is not a guestkey data directory (no guestkey.db or database file)",
            dir.root().display()
        )));
    }
    let _lock = dir
        .hold("stop it first: migrate-roles replaces the certificates it serves with")
        .map_err(|e| CoreError::FailedPrecondition(e.to_string()))?;
    if dir.is_tpm() {
        // The new CA and certificate keys mix the TPM's bytes in.
        match guestkey_protect::tpm::TpmSite::load(&dir.tpm_dir())
            .and_then(|s| guestkey_protect::tpm::Entropy::with_tpm(&s.tcti))
        {
            Ok(e) => crate::ca::use_entropy(e),
            Err(e) => tracing::warn!(error = %e, "new keys from the OS generator alone"),
        }
    }
    let staging = DataDir::new(dir.root().join(".roles-migration"));
    if !dir.is_before_roles() {
        // A migration that stopped after its last rename leaves only this.
        let _ = std::fs::remove_dir_all(staging.root());
        return Err(CoreError::FailedPrecondition(format!(
            "{} already has one CA per role ({} exists): nothing to migrate",
            dir.root().display(),
            dir.server_ca_cert().display()
        )));
    }

    // 1. Everything new, in the staging directory (made again unless a
    //    previous run finished making it).
    let complete = staging.root().join("complete");
    if !complete.exists() {
        match std::fs::remove_dir_all(staging.root()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io("remove", staging.root())(e));
            }
            _ => {}
        }
        for sub in ["ca", "tls", "admin"] {
            let p = staging.root().join(sub);
            create_private_dir(&p).map_err(io("create", &p))?;
        }
        let old =
            std::fs::read_to_string(dir.server_cert()).map_err(io("read", &dir.server_cert()))?;
        let mut sans = subject_alt_names(&old)?;
        if sans.is_empty() {
            sans = DEFAULT_SANS.iter().map(|s| (*s).to_owned()).collect();
        }
        write_role_files(&staging, &sans[0].clone(), sans)?;
        write_private_file(&complete, b"").map_err(io("write", &complete))?;
        sync_dir(staging.root())?;
    }
    let staged_or_installed = |rel: &str| -> Result<String, CoreError> {
        let staged = staging.root().join(rel);
        let p = if staged.exists() {
            staged
        } else {
            dir.root().join(rel)
        };
        let pem = std::fs::read_to_string(&p).map_err(io("read", &p))?;
        let (_, der) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
            .map_err(|e| CoreError::Internal(format!("{} does not parse: {e}", p.display())))?;
        Ok(cert_sha256(&der.contents))
    };
    let server_sha256 = staged_or_installed("tls/server.pem")?;
    let admin_sha256 = staged_or_installed("admin/admin.pem")?;

    // 2. The database: the new admin certificate is the only one, audited.
    let store = crate::database::Database::of(&dir, None)?.open()?;
    let source = opts
        .master_key_source
        .clone()
        .unwrap_or_else(|| dir.default_master_key_source());
    let keys = KeyRing::load(source, store.as_ref())?;
    keys.ensure_audit_key(store.as_ref())?;
    let mut removed_admins = 0;
    {
        let mut tx = store.begin(Access::Write)?;
        if tx.admin_by_cert(&admin_sha256)?.is_none() {
            removed_admins = tx.replace_admins(&admin_sha256, "admin", now_unix())?;
            let key = keys.audit_key(&mut *tx)?;
            audit::append(
                &mut *tx,
                &key,
                "server",
                "server.roles-migrated",
                "",
                &format!(
                    "one CA per role: server certificate sha256 {server_sha256} signed by the new server CA, admin certificate sha256 {admin_sha256} by the new admin CA; the hosts CA ca/ca.pem is kept; {removed_admins} older admin certificate(s) no longer authenticate"
                ),
            )?;
        }
        tx.commit()?;
    }

    // 3. The files, into place.
    for rel in INSTALL {
        let from = staging.root().join(rel);
        if from.exists() {
            let to = dir.root().join(rel);
            std::fs::rename(&from, &to).map_err(io("move the new file to", &to))?;
        }
    }
    for sub in ["ca", "tls", "admin"] {
        sync_dir(&dir.root().join(sub))?;
    }
    std::fs::remove_dir_all(staging.root()).map_err(io("remove", staging.root()))?;
    tracing::warn!(
        server_sha256 = %server_sha256,
        "data directory migrated to one CA per role: run `guestkeyd trust-server` on every host"
    );
    Ok(MigrateReport {
        server_sha256,
        admin_sha256,
        server_ca: dir.server_ca_cert(),
        removed_admins,
    })
}

fn sync_dir(path: &Path) -> Result<(), CoreError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io("sync", path))
}
