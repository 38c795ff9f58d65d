//! Nothing the test run made outlives it. `scripts/test` runs
//! `before_the_run` before `cargo test` and `nothing_is_left_after_the_run`
//! after it, with `GUESTKEY_LEFTOVERS` naming the file between them and
//! `TMPDIR` the run's own temporary folder (which must be empty again):
//! any libvirt domain, pool or secret, process of the suite's programs or
//! its test users, user, or file in the watched folders that is new is
//! named, and the check fails. Both are `#[ignore]`d: a plain `cargo test`
//! runs neither (see `guestkey_tests::leftovers`).

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::path::PathBuf;

use guestkey_tests::leftovers::Snapshot;

fn snapshot_file() -> PathBuf {
    std::env::var_os("GUESTKEY_LEFTOVERS")
        .map(PathBuf::from)
        .expect("GUESTKEY_LEFTOVERS names the snapshot file (scripts/test sets it)")
}

fn run_tmp() -> Option<PathBuf> {
    std::env::var_os("TMPDIR").map(PathBuf::from)
}

#[test]
#[ignore = "run by scripts/test before cargo test"]
fn before_the_run() {
    let s = Snapshot::take(run_tmp().as_deref());
    std::fs::write(snapshot_file(), s.to_json().to_string()).unwrap();
}

#[test]
#[ignore = "run by scripts/test after cargo test"]
fn nothing_is_left_after_the_run() {
    let text = std::fs::read_to_string(snapshot_file()).unwrap();
    let before = Snapshot::from_json(&serde_json::from_str(&text).unwrap()).unwrap();
    // A guest or process that is shutting down gets a moment.
    let mut left = vec![];
    for _ in 0..20 {
        left = before.left_in(&Snapshot::take(run_tmp().as_deref()));
        if left.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    assert!(
        left.is_empty(),
        "the test run left {} things behind:\n  {}",
        left.len(),
        left.join("\n  ")
    );
}

/// The comparison itself: what is new is named by kind; what went away
/// or stayed is not.
#[test]
fn the_installed_hook_and_guestkeyds_lock_files_are_not_leftovers_but_their_neighbours_are() {
    use guestkey_tests::leftovers::installed_state;
    use std::path::Path;
    for p in [
        "/usr/local/lib/guestkey/guestkey-hook",
        "/run/guestkey/hook.sock.lock",
        "/run/guestkey/hook-1001.sock.lock",
        "/run/guestkey/managed-secrets-1001",
    ] {
        assert!(installed_state(Path::new(p)), "{p}");
    }
    for p in [
        "/run/guestkey/hook.sock",
        "/usr/local/lib/guestkey/guestkey-hook.new",
        "/tmp/hook.sock.lock",
        "/run/guestkey/other",
    ] {
        assert!(!installed_state(Path::new(p)), "{p}");
    }
}

#[test]
fn a_leftover_is_named_by_kind() {
    let mut before = Snapshot::default();
    before.files.insert("/tmp/a".into());
    before.libvirt.insert("qemu:///system domain old".into());
    let mut after = Snapshot::default();
    after.files.insert("/tmp/b".into());
    after.libvirt.insert("qemu:///system domain old".into());
    after
        .libvirt
        .insert("qemu:///system pool gk-test-1-p".into());
    after.processes.insert("42 swtpm socket".into());
    assert_eq!(
        before.left_in(&after),
        [
            "libvirt: qemu:///system pool gk-test-1-p",
            "process: 42 swtpm socket",
            "file: /tmp/b"
        ]
    );
    let json = after.to_json();
    assert_eq!(Snapshot::from_json(&json).unwrap(), after);
    assert!(
        Snapshot::from_json(&serde_json::json!({"libvirt": []}))
            .unwrap_err()
            .contains("\"processes\"")
    );
}
