//! Progress of the long operations running on this host (re-encryptions,
//! conversions, block copies), by image path: bytes done of bytes total and
//! a phase. guestkeyd reports it to the server every second while anything
//! runs ([`crate::report`]); `guestkeyctl volume show` and the progress bars
//! of `guestkeyctl` read it there. No key or data in it.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// One running operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// What it is doing, e.g. "re-encrypting".
    pub phase: &'static str,
    /// Bytes done.
    pub done: u64,
    /// Bytes in all (0: not known).
    pub total: u64,
}

static RUNNING: Mutex<BTreeMap<String, Entry>> = Mutex::new(BTreeMap::new());

fn table() -> std::sync::MutexGuard<'static, BTreeMap<String, Entry>> {
    RUNNING.lock().unwrap_or_else(|p| p.into_inner())
}

/// An operation on `path` shown while this guard lives.
pub struct Tracker {
    path: String,
}

impl Tracker {
    /// Starts showing `phase` for `path`, `total` bytes to do (0: unknown).
    pub fn start(path: &str, phase: &'static str, total: u64) -> Self {
        table().insert(
            path.to_owned(),
            Entry {
                phase,
                done: 0,
                total,
            },
        );
        Self {
            path: path.to_owned(),
        }
    }

    /// `done` of `total` bytes.
    pub fn set(&self, done: u64, total: u64) {
        if let Some(e) = table().get_mut(&self.path) {
            e.done = done;
            e.total = total;
        }
    }

    /// Moves on to another phase, starting again at 0.
    pub fn phase(&self, phase: &'static str, total: u64) {
        if let Some(e) = table().get_mut(&self.path) {
            *e = Entry {
                phase,
                done: 0,
                total,
            };
        }
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        table().remove(&self.path);
    }
}

/// What runs now, by path.
pub fn snapshot() -> BTreeMap<String, Entry> {
    table().clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operation_shows_while_its_tracker_lives() {
        let t = Tracker::start("/p/progress-test", "re-encrypting", 100);
        t.set(40, 100);
        assert_eq!(snapshot()["/p/progress-test"].done, 40);
        t.phase("checking", 100);
        assert_eq!(snapshot()["/p/progress-test"].phase, "checking");
        drop(t);
        assert!(!snapshot().contains_key("/p/progress-test"));
    }
}
