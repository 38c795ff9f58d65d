//! One guestkeyd per state directory and per hook socket.
//!
//! A second instance must not take over the first one's hook socket (it
//! would unlink it, and the first would silently stop serving `virsh
//! start`) nor work on the same sealed store. Each of the two is guarded
//! by a lock file held for the life of the process
//! ([`guestkey_instance::InstanceLock`], shared with guestkey-server); the
//! refusal names the holder's PID. `guestkeyd trust-server` takes the
//! state directory's lock too: it rewrites files a running guestkeyd read
//! at start-up.

use std::path::{Path, PathBuf};

use guestkey_instance::Holder;
pub use guestkey_instance::{InstanceLock, LockError};

const HINT: &str = "stop it first, or give this one another --state-dir and --hook-socket";

/// The lock of a state directory (`STATE_DIR/guestkeyd.lock`).
pub fn state_lock(state_dir: &Path) -> Result<InstanceLock, LockError> {
    InstanceLock::acquire(
        &state_dir.join("guestkeyd.lock"),
        Holder {
            program: "guestkeyd",
            what: &format!("serves state directory {}", state_dir.display()),
            hint: HINT,
        },
    )
}

/// The lock of a hook socket (`SOCKET.lock`).
pub fn socket_lock(socket: &Path) -> Result<InstanceLock, LockError> {
    InstanceLock::acquire(
        &socket_lock_path(socket),
        Holder {
            program: "guestkeyd",
            what: &format!("serves hook socket {}", socket.display()),
            hint: HINT,
        },
    )
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
        let dir = std::env::temp_dir().join(format!("gk-lock-{}", hex::encode(b)));
        let first = state_lock(&dir).unwrap();
        let e = state_lock(&dir).err().unwrap().to_string();
        assert!(
            e.contains(&format!(
                "another guestkeyd (pid {}) already serves state directory",
                std::process::id()
            )),
            "{e}"
        );
        assert!(e.contains("stop it first"), "{e}");
        drop(first);
        // Another test of this process may spawn a child (qemu-img) while
        // the first lock's descriptor is open: the child holds a copy of it
        // (and so the lock) until its exec closes it. Wait that out, boundedly.
        let mut again = state_lock(&dir);
        for _ in 0..100 {
            if again.is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            again = state_lock(&dir);
        }
        let again = again.unwrap();
        assert_eq!(again.path(), dir.join("guestkeyd.lock"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
