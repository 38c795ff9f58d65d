//! One guestkey process per directory (or socket).
//!
//! Two processes working on one state must not both run: two guestkeyds on
//! one hook socket (the second would unlink the first one's socket) or one
//! sealed store, two guestkey-servers on one data directory (two pushers,
//! two schedulers, two writers of the audit checkpoints). Each guarded
//! thing has a lock file held with `flock` for the life of the process: the
//! kernel drops it when the process ends, however it ends, so a crash never
//! leaves a stale lock. The file holds the holder's PID, so that a refusal
//! can name it.
//!
//! Imports nothing of guestkey's; used by `host-daemon` (guestkeyd) and
//! `mgmt-server` (guestkey-server).

#![forbid(unsafe_code)]

use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;
use rustix::io::Errno;

/// Who takes a lock, for the refusal a second one gets: "another {program}
/// (pid N) already {what} (lock PATH): {hint}".
#[derive(Debug, Clone, Copy)]
pub struct Holder<'a> {
    /// The program, e.g. `guestkeyd`.
    pub program: &'a str,
    /// What the lock guards, as a verb phrase: `serves hook socket /run/x.sock`.
    pub what: &'a str,
    /// What the second one should do: `stop it first, or ...`.
    pub hint: &'a str,
}

/// A held instance lock; released when dropped (or when the process ends).
pub struct InstanceLock {
    _file: std::fs::File,
    path: PathBuf,
}

/// Another process holds the lock, or the lock file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error("another {program} (pid {pid}) already {what} (lock {path}): {hint}")]
    Held {
        /// The program.
        program: String,
        /// What the lock guards.
        what: String,
        /// The holder's PID (`unknown` if the file holds none).
        pid: String,
        /// The lock file.
        path: String,
        /// What to do.
        hint: String,
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
    /// Takes the lock `path` (made if missing, mode 0600, never through a
    /// symbolic link) for `holder`, or says who holds it.
    pub fn acquire(path: &Path, holder: Holder<'_>) -> Result<Self, LockError> {
        let io = |source| LockError::Io {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
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
                let _ = f.take(32).read_to_string(&mut pid);
                return Err(LockError::Held {
                    program: holder.program.to_owned(),
                    what: holder.what.to_owned(),
                    pid: match pid.trim() {
                        "" => "unknown".to_owned(),
                        p => p.to_owned(),
                    },
                    path: path.display().to_string(),
                    hint: holder.hint.to_owned(),
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

#[cfg(test)]
mod tests {
    use super::*;

    const TEST: Holder<'static> = Holder {
        program: "test",
        what: "guards the test",
        hint: "stop it first",
    };

    fn temp_path() -> PathBuf {
        let mut b = [0u8; 6];
        getrandom::fill(&mut b).unwrap();
        let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
        std::env::temp_dir().join(format!("gk-lock-{hex}"))
    }

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid() {
        let p = temp_path();
        let first = InstanceLock::acquire(&p, TEST).unwrap();
        // flock locks belong to the open file: a second open in this
        // process conflicts like another process would.
        let e = InstanceLock::acquire(&p, TEST).err().unwrap().to_string();
        assert_eq!(
            e,
            format!(
                "another test (pid {}) already guards the test (lock {}): stop it first",
                std::process::id(),
                p.display()
            )
        );
        drop(first);
        let again = InstanceLock::acquire(&p, TEST).unwrap();
        assert_eq!(again.path(), p);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn a_link_in_place_of_the_lock_file_is_refused() {
        let p = temp_path();
        let target = temp_path();
        std::fs::write(&target, "x").unwrap();
        std::os::unix::fs::symlink(&target, &p).unwrap();
        let e = InstanceLock::acquire(&p, TEST).err().unwrap().to_string();
        assert!(e.starts_with("cannot use the lock file"), "{e}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "x");
        std::fs::remove_file(p).unwrap();
        std::fs::remove_file(target).unwrap();
    }
}
