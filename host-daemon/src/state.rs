//! The host daemon's state directory.
//!
//! ```text
//! STATE_DIR/            0700
//!   host                the host name given at enrollment
//!   tls.key, tls.pem    the host's TLS key (0600) and certificate
//!   ca.pem              the management server's CA
//!   server.sha256       the server certificate this host accepts
//!   sealing.key         X25519 private key for key packets (0600)
//!   store.key           key of the sealed guest store (0600)
//!   volumes.json        volumes created here: ids, names, paths, secret UUIDs (no keys)
//!   guests/UUID.sealed  per guest: its domain XML and key packets, sealed
//! ```

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Paths in a state directory.
#[derive(Debug, Clone)]
pub struct StateDir(PathBuf);

impl StateDir {
    /// The layout under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self(root.into())
    }
    /// The directory.
    pub fn root(&self) -> &Path {
        &self.0
    }
    /// A file in it.
    pub fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    /// The sealed guest store.
    pub fn guests(&self) -> PathBuf {
        self.0.join("guests")
    }
}

/// Creates a directory with mode 0700.
pub fn private_dir(path: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

/// Writes `data` to `path` atomically (temp file, fsync, rename, fsync of
/// the directory), mode 0600.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().map_or("f".into(), |n| n.to_string_lossy()),
        std::process::id()
    ));
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}
