//! The server's data directory: what lives where.
//!
//! ```text
//! DATA_DIR/
//!   guestkey.db          SQLite database (keys only as ciphertext)
//!   audit-checkpoints    signed heads of the audit log, appended to only
//!   master.key           master key, base64, 0600 (unless another source is chosen)
//!   ca/ca.pem            CA certificate: signs the server, admin and host certificates
//!   ca/ca.key            CA private key, 0600
//!   tls/server.pem       server certificate (also its client certificate towards hosts)
//!   tls/server.key       0600
//!   admin/ca.pem         admin credential: the CA certificate,
//!   admin/admin.pem      the admin client certificate,
//!   admin/admin.key      its key (0600),
//!   admin/server         and the server URL
//! ```
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
    /// Default master key file.
    pub fn master_key(&self) -> PathBuf {
        self.root.join("master.key")
    }
    /// CA certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca/ca.pem")
    }
    /// CA private key.
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("ca/ca.key")
    }
    /// Where the CA key is kept: its file, through a key protector.
    pub fn ca_key_source(&self) -> guestkey_protect::ProtectorSpec {
        guestkey_protect::ProtectorSpec::File(self.ca_key())
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
