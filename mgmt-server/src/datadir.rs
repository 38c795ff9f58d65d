//! The server's data directory: what lives where.
//!
//! ```text
//! DATA_DIR/
//!   guestkey.db          SQLite database (keys only as ciphertext)
//!   database             or: the PostgreSQL URL the server uses, 0600
//!                        (init --database; no guestkey.db then)
//!   audit-checkpoints    signed heads of the audit log, appended to only
//!   master.key           master key, base64, 0600 (unless another source is chosen)
//!   guestkey-server.lock held by the running server (its PID inside)
//!   ca/ca.pem            hosts CA: signs host certificates only (at enrollment)
//!   ca/ca.key            its private key, 0600
//!   ca/server-ca.pem     server CA: signs the server's certificate only
//!   ca/server-ca.key     0600 (used by init and migrate-roles, never by run)
//!   ca/admin-ca.pem      admin CA: signs admin certificates only
//!   ca/admin-ca.key      0600 (used by init and migrate-roles, never by run)
//!   tls/server.pem       server certificate (also its client certificate towards hosts)
//!   tls/server.key       0600
//!   admin/ca.pem         admin credential: the server CA certificate,
//!   admin/server.sha256  the server certificate's SHA-256 (pinned),
//!   admin/admin.pem      the admin client certificate,
//!   admin/admin.key      its key (0600),
//!   admin/server         and the server URL
//!   tpm/                 only when the keys are sealed to the TPM (init
//!                        --master-key-source tpm, or reseal --to-tpm):
//!   tpm/site.json          which TPM and PCRs, the PCR authority's public key
//!   tpm/approvals.json     PCR values the authority signed
//!   tpm/master.key.tpm     the master key, sealed (no master.key then)
//!   tpm/ca.key.tpm, tpm/server-ca.key.tpm, tpm/admin-ca.key.tpm
//!                          the CA keys, sealed (no ca/*.key then)
//!   recovery-shares/     only after init --recovery-shares without --shares-out:
//!                        share-I-of-N.age, one a custodian (move them away)
//! ```
//!
//! A data directory made before certificates had roles has only `ca/ca.pem`
//! (it signed every certificate) and no `admin/server.sha256`; `guestkey-server
//! migrate-roles` brings it to this layout (see `crate::roles`).
//!
//! A leaf module: imports nothing of this crate.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Paths inside a data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// The layout under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// SQLite database.
    pub fn db(&self) -> PathBuf {
        self.root.join("guestkey.db")
    }
    /// The database URL `init --database` recorded (absent: SQLite, `db`).
    pub fn database_file(&self) -> PathBuf {
        self.root.join("database")
    }
    /// Default master key file.
    pub fn master_key(&self) -> PathBuf {
        self.root.join("master.key")
    }
    /// The directory of the keys sealed to the TPM.
    pub fn tpm_dir(&self) -> PathBuf {
        self.root.join("tpm")
    }
    /// Whether the keys of this data directory are sealed to the TPM.
    pub fn is_tpm(&self) -> bool {
        self.tpm_dir()
            .join(guestkey_protect::tpm::SITE_FILE)
            .exists()
    }
    /// Finishes a switch of `tpm/` that `reseal` left half-way, and
    /// removes what a finished or abandoned one left behind.
    pub fn recover_tpm(&self) -> std::io::Result<()> {
        guestkey_protect::tpm::keyset::recover(&self.root)
    }
    /// A key of this directory: sealed in `tpm/NAME.tpm` when the keys
    /// are sealed to the TPM, else the file `file`.
    fn key_source(&self, name: &str, file: PathBuf) -> guestkey_protect::ProtectorSpec {
        if self.is_tpm() {
            guestkey_protect::ProtectorSpec::Tpm(self.tpm_dir().join(format!("{name}.tpm")))
        } else {
            guestkey_protect::ProtectorSpec::File(file)
        }
    }
    /// Where the master key is unless another source is named.
    pub fn default_master_key_source(&self) -> guestkey_protect::ProtectorSpec {
        self.key_source("master.key", self.master_key())
    }
    /// `source` with `tpm` (no path) made this directory's sealed master key.
    pub fn resolve_master_key_source(
        &self,
        source: guestkey_protect::ProtectorSpec,
    ) -> guestkey_protect::ProtectorSpec {
        match source {
            guestkey_protect::ProtectorSpec::Tpm(p) if p.as_os_str().is_empty() => {
                guestkey_protect::ProtectorSpec::Tpm(self.tpm_dir().join("master.key.tpm"))
            }
            other => other,
        }
    }
    /// Hosts CA certificate (in data directories made before roles: the
    /// one CA of every certificate).
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca/ca.pem")
    }
    /// Hosts CA private key.
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("ca/ca.key")
    }
    /// Where the hosts CA key is kept: its file, through a key protector.
    pub fn ca_key_source(&self) -> guestkey_protect::ProtectorSpec {
        self.key_source("ca.key", self.ca_key())
    }
    /// Server CA certificate.
    pub fn server_ca_cert(&self) -> PathBuf {
        self.root.join("ca/server-ca.pem")
    }
    /// Where the server CA key is kept.
    pub fn server_ca_key_source(&self) -> guestkey_protect::ProtectorSpec {
        self.key_source("server-ca.key", self.root.join("ca/server-ca.key"))
    }
    /// Admin CA certificate.
    pub fn admin_ca_cert(&self) -> PathBuf {
        self.root.join("ca/admin-ca.pem")
    }
    /// Where the admin CA key is kept.
    pub fn admin_ca_key_source(&self) -> guestkey_protect::ProtectorSpec {
        self.key_source("admin-ca.key", self.root.join("ca/admin-ca.key"))
    }
    /// Whether this data directory predates separate CAs per role.
    pub fn is_before_roles(&self) -> bool {
        !self.server_ca_cert().exists()
    }
    /// The lock the running server holds.
    pub fn lock(&self) -> PathBuf {
        self.root.join("guestkey-server.lock")
    }
    /// Takes the data directory's lock for this process's life, or says
    /// which guestkey-server holds it; `hint` says what to do then.
    pub fn hold(
        &self,
        hint: &str,
    ) -> Result<guestkey_instance::InstanceLock, guestkey_instance::LockError> {
        guestkey_instance::InstanceLock::acquire(
            &self.lock(),
            guestkey_instance::Holder {
                program: "guestkey-server",
                what: &format!("runs on data directory {}", self.root.display()),
                hint,
            },
        )
    }
    /// Server certificate.
    pub fn server_cert(&self) -> PathBuf {
        self.root.join("tls/server.pem")
    }
    /// Server private key.
    pub fn server_key(&self) -> PathBuf {
        self.root.join("tls/server.key")
    }
    /// Signed heads of the audit log, one a line (only ever appended to).
    pub fn audit_checkpoints(&self) -> PathBuf {
        self.root.join("audit-checkpoints")
    }
    /// Admin credential directory.
    pub fn admin_dir(&self) -> PathBuf {
        self.root.join("admin")
    }
    /// The pin of the server's certificate in the admin credential.
    pub fn admin_server_pin(&self) -> PathBuf {
        self.root.join("admin/server.sha256")
    }
}

/// Creates a directory with mode 0700 (parents as needed).
pub fn create_private_dir(path: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

/// Writes a new file with mode 0600, refusing to overwrite, and syncs it.
pub fn write_private_file(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// Writes a new public file (mode 0644), refusing to overwrite.
pub fn write_public_file(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// Checks that `dir` is a real directory (not a symbolic link) owned by
/// this user and writable by no one else, so that a file made in it
/// cannot be swapped or redirected by another user before it is used.
/// The error names the directory and what to change.
pub fn check_owned_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(dir)
        .map_err(|e| format!("cannot use {} ({e})", dir.display()))?;
    if !meta.is_dir() {
        return Err(format!(
            "{} is not a directory (or is a symbolic link): give a path in a real directory",
            dir.display()
        ));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me || meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{} is writable by others than its owner, or not owned by this user (uid {me}): give a path in a directory only this user can write (chmod go-w, or another one)",
            dir.display()
        ));
    }
    Ok(())
}

/// The directory `path` is in (`.` for a bare name).
pub fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Syncs a directory (after a file in it was created or renamed).
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}
