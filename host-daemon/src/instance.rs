//! One guestkeyd per state directory and per hook socket.
//!
//! A second instance must not take over the first one's hook socket (it
//! would unlink it, and the first would silently stop serving `virsh
//! start`) nor work on the same sealed store. Each of the two is guarded
//! by a lock file held with `flock` for the life of the process (the kernel
//! drops it when the process dies, however it dies); the file holds the
//! holder's PID, so that the refusal can name it.

use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;
use rustix::io::Errno;

/// A held instance lock; released when dropped (or when the process ends).
pub struct InstanceLock {
    _file: std::fs::File,
    path: PathBuf,
}

/// Another process holds the lock, or the lock file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another guestkeyd runs.
    #[error(
        "another guestkeyd (pid {pid}) already serves {what} (lock {path}): stop it first, or give this one another --state-dir and --hook-socket"
    )]
    Held {
        /// What the lock guards.
        what: String,
        /// The holder.
        pid: String,
        /// The lock file.
        path: String,
    },
    /// The lock file failed.
    #[error("cannot use the lock file {path}: {source}")]
    Io {
        /// The lock file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl InstanceLock {
    /// Takes the lock `path` (made if missing, mode 0600) for `what`.
    pub fn acquire(path: &Path, what: &str) -> Result<Self, LockError> {
        let io = |source| LockError::Io {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(io)?;
        match rustix::fs::flock(&f, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(Errno::WOULDBLOCK) => {
                let mut pid = String::new();
                let _ = f.read_to_string(&mut pid);
                return Err(LockError::Held {
                    what: what.to_owned(),
                    pid: match pid.trim() {
                        "" => "unknown".to_owned(),
                        p => p.to_owned(),
                    },
                    path: path.display().to_string(),
                });
            }
            Err(e) => return Err(io(e.into())),
        }
        f.set_len(0)
            .and_then(|()| f.rewind())
            .and_then(|()| writeln!(f, "{}", std::process::id()))
            .and_then(|()| f.flush())
            .map_err(io)?;
        Ok(Self {
            _file: f,
            path: path.to_owned(),
        })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The lock file of a hook socket.
pub fn socket_lock_path(socket: &Path) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid() {
        let mut b = [0u8; 6];
        getrandom::fill(&mut b).unwrap();
        let p = std::env::temp_dir().join(format!("gk-lock-{}", hex::encode(b)));
        let first = InstanceLock::acquire(&p, "the test").unwrap();
        // flock locks belong to the open file: a second open in this
        // process conflicts like another process would.
        let e = InstanceLock::acquire(&p, "the test")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        assert!(e.contains("stop it first"), "{e}");
        drop(first);
        let again = InstanceLock::acquire(&p, "the test").unwrap();
        assert_eq!(again.path(), p);
        std::fs::remove_file(p).unwrap();
    }
}
