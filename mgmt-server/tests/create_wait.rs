//! `guestkeyctl volume create` waits until the host made the volume, as
//! `virsh vol-create` does; `--no-wait` returns at once; the wait is
//! bounded by `--timeout`. Against the real server binaries, with
//! `common::TestAgent` as the host (see its header).

#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Stdio};

use common::*;

const FAST_RETRY: &str = "[retry]\ninitial_delay_ms = 100\nmax_delay_ms = 200\n";

fn create(name: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "volume", "create", "--host", "kvm-w", "--pool", "p", "--name", name, "--size", "1M",
    ]
    .iter()
    .map(|a| (*a).to_owned())
    .collect();
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    args
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn volume_create_waits_until_the_host_made_the_volume() {
    let s = start_server(Some(FAST_RETRY));
    let mut a = TestAgent::enroll(&s, "kvm-w");

    // The host does not serve yet. --no-wait returns the queued request.
    let v = s.json(&strs(&create("queued", &["--no-wait"])));
    assert_eq!(v["state"], "pending-create", "{v}");
    // A wait that runs out fails, says the volume stays pending and how
    // to look, and leaves the request queued.
    let e = s.fails(&strs(&create("slow", &["--timeout", "1s"])));
    assert!(
        e.starts_with("guestkeyctl: volume slow is still pending-create after 1s"),
        "{e}"
    );
    assert!(
        e.contains(
            "it stays pending and the server keeps retrying; see `guestkeyctl volume show slow`"
        ),
        "{e}"
    );
    assert_eq!(
        s.json(&["volume", "show", "slow"])["state"],
        "pending-create"
    );
    assert!(a.creates().is_empty());

    // The host serves: create returns once the host made the volume.
    a.serve();
    let v = s.json(&strs(&create("now", &[])));
    assert_eq!(v["state"], "ready", "{v}");
    assert!(
        a.creates()
            .iter()
            .any(|c| matches!(c, Received::Create { name, .. } if name == "now")),
        "the host had not made it when create returned"
    );
    let text = s.ok(&strs(&create("text", &[])));
    assert!(text.contains("\nstate           ready\n"), "{text}");
    // The queued requests are made too.
    s.wait_for(20, "the queued volumes made", || {
        ["queued", "slow"]
            .iter()
            .all(|n| s.json(&["volume", "show", n])["state"] == "ready")
    });
}

#[test]
fn bad_wait_flags_are_refused() {
    let s = start_server(None);
    let _a = TestAgent::enroll(&s, "kvm-w");
    let before = s.state_snapshot();
    let e = s.fails(&strs(&create("x", &["--timeout", "0s"])));
    assert!(
        e.contains("invalid duration \"0s\": must be longer than 0"),
        "{e}"
    );
    let e = s.fails(&strs(&create("x", &["--timeout", "5m", "--no-wait"])));
    assert!(
        e.contains("'--timeout <DURATION>' cannot be used with '--no-wait'"),
        "{e}"
    );
    assert_eq!(s.state_snapshot(), before);
}

/// A volume whose request ends otherwise than ready while create waits
/// (here: its host is revoked and the volume crypto-shredded) makes create
/// fail with the server's last error.
#[test]
fn volume_create_fails_with_the_last_error_when_the_volume_is_not_made() {
    let s = start_server(Some(FAST_RETRY));
    let _a = TestAgent::enroll(&s, "kvm-w"); // never serves
    let waiting = Command::new(CTL)
        .args(create("doomed", &["--timeout", "5m"]))
        .env("GUESTKEY_SERVER", &s.url)
        .env("GUESTKEY_ADMIN_DIR", s.admin_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    s.wait_for(20, "the volume requested", || {
        s.ctl(&["volume", "show", "doomed"]).status.success()
    });
    s.ok(&["host", "revoke", "kvm-w"]);
    assert_eq!(s.json(&["volume", "delete", "doomed"])["state"], "deleted");
    let out = waiting.wait_with_output().unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{e}");
    assert!(out.stdout.is_empty());
    assert!(
        e.starts_with(
            "guestkeyctl: volume doomed was not created: it is deleted (host kvm-w is revoked: its image was left there"
        ),
        "{e}"
    );
}
