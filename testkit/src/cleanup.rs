//! What a test, benchmark or demo made, removed when it is done: when its
//! guard drops (also when the code panics), and when the process gets
//! SIGINT, SIGTERM or SIGHUP (Ctrl-C in a terminal, `timeout`, a closed
//! session). What cannot be removed is named on standard error, with the
//! command that removes it.
//!
//! ```no_run
//! use guestkey_testkit::cleanup::Made;
//! let dir = std::env::temp_dir().join("gk-example");
//! std::fs::create_dir_all(&dir).unwrap();
//! let _dir = Made::dir(&dir);
//! let _guest = Made::domain("qemu:///system", "gk-bench-example");
//! // ... both are removed at the end of the scope, or on Ctrl-C.
//! ```

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once};

type Undo = Box<dyn FnOnce() -> Result<(), String> + Send>;

/// One thing made, with how to remove it and how to say it.
struct Entry {
    what: String,
    undo: Undo,
}

/// What is registered now, in the order it was made.
static MADE: Mutex<BTreeMap<u64, Entry>> = Mutex::new(BTreeMap::new());
static NEXT: AtomicU64 = AtomicU64::new(1);
static SIGNALS: Once = Once::new();

/// A thing made; removed when this guard drops, or on a signal that ends
/// the process first.
#[must_use = "the thing is removed when the guard drops"]
pub struct Made {
    id: u64,
}

impl Made {
    /// Registers `undo`, which removes what `what` names (e.g. "libvirt
    /// domain gk-bench-1 (virsh undefine gk-bench-1)"). The first
    /// registration of a process starts the signal watcher.
    pub fn new(
        what: impl Into<String>,
        undo: impl FnOnce() -> Result<(), String> + Send + 'static,
    ) -> Self {
        SIGNALS.call_once(watch_signals);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let entry = Entry {
            what: what.into(),
            undo: Box::new(undo),
        };
        lock().insert(id, entry);
        Made { id }
    }

    /// A directory (or file), removed with all it holds.
    pub fn dir(path: &Path) -> Self {
        let p: PathBuf = path.to_owned();
        Made::new(format!("{} (rm -rf it)", path.display()), move || {
            remove_path(&p)
        })
    }

    /// A libvirt domain, stopped and undefined (transient or persistent).
    pub fn domain(uri: &str, name: &str) -> Self {
        let (uri, name) = (uri.to_owned(), name.to_owned());
        let what = format!("libvirt domain {name} (virsh -c {uri} destroy/undefine {name})");
        Made::new(what, move || {
            let _ = virsh(&uri, &["destroy", &name]);
            match virsh(&uri, &["undefine", "--nvram", &name]) {
                Ok(()) => Ok(()),
                Err(_) if !exists(&uri, &["dominfo", &name]) => Ok(()),
                Err(e) => virsh(&uri, &["undefine", &name]).map_err(|_| e),
            }
        })
    }

    /// A libvirt storage pool, stopped and undefined.
    pub fn pool(uri: &str, name: &str) -> Self {
        let (uri, name) = (uri.to_owned(), name.to_owned());
        let what =
            format!("libvirt pool {name} (virsh -c {uri} pool-destroy/pool-undefine {name})");
        Made::new(what, move || {
            let _ = virsh(&uri, &["pool-destroy", &name]);
            match virsh(&uri, &["pool-undefine", &name]) {
                Err(_) if !exists(&uri, &["pool-info", &name]) => Ok(()),
                r => r,
            }
        })
    }

    /// A libvirt secret, undefined.
    pub fn secret(uri: &str, uuid: &str) -> Self {
        let (uri, uuid) = (uri.to_owned(), uuid.to_owned());
        let what = format!("libvirt secret {uuid} (virsh -c {uri} secret-undefine {uuid})");
        Made::new(what, move || {
            match virsh(&uri, &["secret-undefine", &uuid]) {
                Err(_) if !exists(&uri, &["secret-dumpxml", &uuid]) => Ok(()),
                r => r,
            }
        })
    }

    /// A child process, killed (SIGKILL) unless it ended already. For a
    /// process the caller waits for itself: on a signal it is killed here;
    /// dropped normally, the guard forgets it (the caller reaped it).
    pub fn process(pid: u32, what: &str) -> ProcessGuard {
        let what = format!("process {pid} ({what}; kill {pid})");
        let made = Made::new(what, move || {
            use rustix::process::{Pid, Signal, kill_process};
            let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
                return Err(format!("{pid} is no process id"));
            };
            match kill_process(pid, Signal::KILL) {
                Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
                Err(e) => Err(e.to_string()),
            }
        });
        ProcessGuard(Some(made))
    }

    /// Forgets the thing without removing it (it was handed on, or removed
    /// otherwise).
    pub fn forget(self) {
        lock().remove(&self.id);
        std::mem::forget(self);
    }
}

impl Drop for Made {
    fn drop(&mut self) {
        let entry = lock().remove(&self.id);
        if let Some(e) = entry {
            run(e);
        }
    }
}

/// The guard of a child process (see [`Made::process`]).
pub struct ProcessGuard(Option<Made>);

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        if let Some(m) = self.0.take() {
            m.forget();
        }
    }
}

fn lock() -> std::sync::MutexGuard<'static, BTreeMap<u64, Entry>> {
    // A panic while the lock was held cannot leave it inconsistent: the
    // map is only inserted into and removed from.
    MADE.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn run(e: Entry) {
    if let Err(why) = (e.undo)() {
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "could not remove {}: {why}", e.what);
    }
}

/// Removes everything still registered, newest first.
pub fn remove_all() {
    loop {
        let last = {
            let mut m = lock();
            let key = m.keys().next_back().copied();
            key.and_then(|k| m.remove(&k))
        };
        match last {
            Some(e) => run(e),
            None => break,
        }
    }
}

/// On SIGINT, SIGTERM or SIGHUP: removes what is registered, then ends the
/// process as the signal would have (exit status 128 + N).
fn watch_signals() {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) else {
        return;
    };
    let spawned = std::thread::Builder::new()
        .name("gk-cleanup".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                let mut err = std::io::stderr().lock();
                let _ = writeln!(err, "signal {sig}: removing what was made");
                drop(err);
                remove_all();
                std::process::exit(128 + sig);
            }
        });
    if spawned.is_err() {
        let _ = writeln!(
            std::io::stderr(),
            "no cleanup on signals: the watcher thread did not start"
        );
    }
}

fn remove_path(p: &Path) -> Result<(), String> {
    let r = match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    r.map_err(|e| e.to_string())
}

fn virsh(uri: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new("virsh")
        .args(["-q", "-c", uri])
        .args(args)
        .output()
        .map_err(|e| format!("virsh: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

fn exists(uri: &str, args: &[&str]) -> bool {
    virsh(uri, args).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guard_removes_on_drop_and_forget_keeps() {
        let base = std::env::temp_dir().join(format!("gk-cleanup-{}", std::process::id()));
        let (a, b) = (base.join("a"), base.join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        drop(Made::dir(&a));
        assert!(!a.exists());
        Made::dir(&b).forget();
        assert!(b.exists());
        {
            let _m = Made::dir(&b);
            let _n = Made::dir(&base);
        }
        assert!(!base.exists());
    }

    #[test]
    fn what_cannot_be_removed_is_reported_and_the_rest_still_goes() {
        let seen = std::sync::Arc::new(Mutex::new(vec![]));
        let s = seen.clone();
        let _a = Made::new("first", move || {
            s.lock().unwrap().push("first");
            Ok(())
        });
        let s = seen.clone();
        let _b = Made::new("second", move || {
            s.lock().unwrap().push("second");
            Err("busy".into())
        });
        drop((_b, _a));
        let ours = seen.lock().unwrap().clone();
        assert_eq!(ours, ["second", "first"]);
    }
}
