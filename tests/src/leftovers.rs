//! What the test run made that could outlive it: libvirt domains, pools
//! and secrets (on the system libvirtd and the session libvirtds of `gkh1`
//! and `gkh2`), processes of the programs the suite starts, users, and the
//! files in the places tests write to. `scripts/test` takes a [`Snapshot`]
//! before `cargo test` and compares one taken after it
//! (`tests/tests/leftovers.rs`): whatever is new is a leftover.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

/// The session users of the migration tests (made by scripts/setup).
pub const SESSION_USERS: [&str; 2] = ["gkh1", "gkh2"];

/// Programs the suite starts; any of them still running is a leftover.
const PROGRAMS: [&str; 12] = [
    "guestkeyd",
    "guestkey-server",
    "guestkeyctl",
    "guestkey-hook",
    "swtpm",
    "qemu-system-x86_64",
    "qemu-img",
    "qemu-io",
    "qemu-nbd",
    "cryptsetup",
    "virsh",
    "tpm2_pcrextend",
];

/// Daemons of the test bed that the tests' users may run (started by
/// scripts/setup or on demand by libvirt): not leftovers.
const TEST_BED_DAEMONS: [&str; 5] = [
    "libvirtd",
    "virtlogd",
    "virtlockd",
    "dbus-daemon",
    "dnsmasq",
];

/// Folders whose entries are compared (top level only; the run's own
/// temporary folder is compared whole).
const WATCHED: [&str; 8] = [
    "/tmp",
    "/srv/guestkey-shared",
    "/run/guestkey",
    "/var/tmp",
    "/dev/shm",
    "/var/lib/guestkey-tests",
    "/var/lib/libvirt/images",
    "/usr/local/lib/guestkey",
];

/// What exists at one moment.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// "URI domain NAME", "URI pool NAME", "URI secret UUID (usage)".
    pub libvirt: BTreeSet<String>,
    /// "PID NAME ARGS" of the suite's programs and its users' processes.
    pub processes: BTreeSet<String>,
    /// Login names.
    pub users: BTreeSet<String>,
    /// Paths.
    pub files: BTreeSet<String>,
}

impl Snapshot {
    /// Takes one now. `run_tmp`: the run's temporary folder (`TMPDIR`),
    /// listed whole.
    pub fn take(run_tmp: Option<&Path>) -> Self {
        let mut s = Snapshot::default();
        let mut uris = vec!["qemu:///system".to_owned()];
        for u in SESSION_USERS {
            let sock = format!("/home/{u}/.cache/libvirt/libvirt-sock");
            if Path::new(&sock).exists() {
                uris.push(format!("qemu+unix:///session?socket={sock}"));
            }
        }
        for uri in &uris {
            for name in virsh_lines(uri, &["list", "--all", "--name"]) {
                s.libvirt.insert(format!("{uri} domain {name}"));
            }
            for name in virsh_lines(uri, &["pool-list", "--all", "--name"]) {
                s.libvirt.insert(format!("{uri} pool {name}"));
            }
            for line in virsh_lines(uri, &["secret-list"]) {
                s.libvirt.insert(format!("{uri} secret {line}"));
            }
        }
        s.processes = processes();
        s.users = users();
        for dir in WATCHED {
            entries(Path::new(dir), false, &mut s.files);
        }
        if let Some(t) = run_tmp {
            entries(t, true, &mut s.files);
        }
        s
    }

    /// What `later` has that this one had not, by kind, as lines for a
    /// report (empty: nothing was left).
    pub fn left_in(&self, later: &Snapshot) -> Vec<String> {
        let mut out = vec![];
        let new = |a: &BTreeSet<String>, b: &BTreeSet<String>| -> Vec<String> {
            b.difference(a).cloned().collect()
        };
        for l in new(&self.libvirt, &later.libvirt) {
            out.push(format!("libvirt: {l}"));
        }
        for p in new(&self.processes, &later.processes) {
            out.push(format!("process: {p}"));
        }
        for u in new(&self.users, &later.users) {
            out.push(format!("user: {u}"));
        }
        for f in new(&self.files, &later.files) {
            out.push(format!("file: {f}"));
        }
        out
    }

    /// As JSON, for the file between the two steps.
    pub fn to_json(&self) -> Value {
        json!({
            "libvirt": self.libvirt,
            "processes": self.processes,
            "users": self.users,
            "files": self.files,
        })
    }

    /// From [`Snapshot::to_json`]'s output.
    pub fn from_json(v: &Value) -> Result<Self, String> {
        let set = |k: &str| -> Result<BTreeSet<String>, String> {
            v[k].as_array()
                .ok_or_else(|| format!("the snapshot has no list {k:?}"))?
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| format!("a non-string in {k:?}"))
                })
                .collect()
        };
        Ok(Snapshot {
            libvirt: set("libvirt")?,
            processes: set("processes")?,
            users: set("users")?,
            files: set("files")?,
        })
    }
}

fn virsh_lines(uri: &str, args: &[&str]) -> Vec<String> {
    let Ok(out) = Command::new("virsh")
        .args(["-q", "-c", uri])
        .args(args)
        .output()
    else {
        return vec![];
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .collect()
}

/// The processes that count: the suite's programs, and anything run by a
/// test user (`gkh1`, `gkh2`, the hardening test's attacker) but the test
/// bed's daemons.
fn processes() -> BTreeSet<String> {
    let test_uids: BTreeSet<u32> = users_with_uid()
        .into_iter()
        .filter(|(n, _)| SESSION_USERS.contains(&n.as_str()) || n.starts_with("gk-"))
        .map(|(_, uid)| uid)
        .collect();
    let me = std::process::id();
    let mut out = BTreeSet::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let base = e.path();
        let Ok(cmdline) = std::fs::read(base.join("cmdline")) else {
            continue;
        };
        if cmdline.is_empty() {
            continue; // a kernel thread, or gone
        }
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let comm = std::fs::read_to_string(base.join("comm"))
            .unwrap_or_default()
            .trim()
            .to_owned();
        let exe = args
            .first()
            .map(|a| a.rsplit('/').next().unwrap_or(a).to_owned())
            .unwrap_or_default();
        let uid = std::fs::read_to_string(base.join("status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .and_then(|l| l.split_whitespace().next().map(str::to_owned))
            })
            .and_then(|u| u.parse::<u32>().ok());
        let ours = PROGRAMS.contains(&exe.as_str()) || PROGRAMS.contains(&comm.as_str());
        let test_user = uid.is_some_and(|u| test_uids.contains(&u))
            && !TEST_BED_DAEMONS.contains(&comm.as_str());
        if ours || test_user {
            out.insert(format!("{pid} {}", args.join(" ")));
        }
    }
    out
}

fn users_with_uid() -> Vec<(String, u32)> {
    std::fs::read_to_string("/etc/passwd")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?.to_owned();
            let uid = f.nth(1)?.parse().ok()?;
            Some((name, uid))
        })
        .collect()
}

fn users() -> BTreeSet<String> {
    users_with_uid().into_iter().map(|(n, _)| n).collect()
}

/// The entries of `dir` (recursively if `deep`), by path.
/// What a host keeps by design once guestkey ran on it, which the first
/// run on a fresh machine makes: the installed hook binary, and guestkeyd's
/// lock files and lists of the secrets it manages (kept across restarts on
/// purpose; the secrets themselves are checked in libvirt).
pub fn installed_state(p: &Path) -> bool {
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match p.parent().and_then(Path::to_str) {
        Some("/usr/local/lib/guestkey") => name == "guestkey-hook",
        Some("/run/guestkey") => {
            name.ends_with(".sock.lock") || name.starts_with("managed-secrets")
        }
        _ => false,
    }
}

fn entries(dir: &Path, deep: bool, out: &mut BTreeSet<String>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p: PathBuf = e.path();
        if installed_state(&p) {
            continue;
        }
        out.insert(p.display().to_string());
        if deep && e.file_type().is_ok_and(|t| t.is_dir()) {
            entries(&p, true, out);
        }
    }
}
