//! Release gates, operator approval, end to end: the real server,
//! guestkeyd and hook, and real libvirtd/KVM guests. A guest whose disk is
//! released `approved` starts only when an operator approved that start.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::time::Duration;

use guestkey_tests::stack::Stack;
use guestkey_tests::{virsh, volume_domain_xml};

/// A start waits 4 s for an approval; retries are quick.
const CONFIG: &str =
    "[limits]\napproval_wait_secs = 4\n[retry]\ninitial_delay_ms = 200\nmax_delay_ms = 1000\n";

fn audited(s: &Stack, action: &str) -> Vec<serde_json::Value> {
    s.audit(action)
}

/// The id (rq-...) a refusal names.
fn request_id(text: &str) -> String {
    let at = text.find("request rq-").expect("a request id") + "request ".len();
    text[at..at + 15].to_owned()
}

fn pending(s: &Stack) -> Vec<serde_json::Value> {
    s.json(&["pending", "list"]).as_array().unwrap().clone()
}

#[test]
fn a_start_waits_for_an_operator_and_each_approval_opens_one_start() {
    let s = Stack::start_configured(&[], Some(CONFIG));
    s.json(&[
        "volume",
        "create",
        "--host",
        &s.host,
        "--pool",
        &s.pool,
        "--name",
        "apr-disk",
        "--size",
        "16M",
        "--release",
        "approved",
    ]);
    let id = s.json(&["volume", "show", "apr-disk"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let guest = format!("gk-test-{}-apr", std::process::id());
    let mut cleanup = guestkey_tests::Cleanup::default();
    s.define_guest(
        &mut cleanup,
        &guest,
        &volume_domain_xml(&guest, &s.pool, "apr-disk", "qcow2"),
    );
    let released = |s: &Stack| {
        audited(s, "key.released")
            .iter()
            .filter(|r| r["subject"] == id.as_str())
            .count()
    };
    assert_eq!(released(&s), 1, "only the create's");

    // No operator: the start fails after the wait, naming the request and
    // the command; the request waits in the queue.
    let e = virsh(&["start", &guest]).unwrap_err().0;
    assert!(e.contains("waits for an operator's approval"), "{e}");
    let rq = request_id(&e);
    assert!(
        e.contains(&format!("guestkeyctl pending approve {rq}")),
        "{e}"
    );
    let list = pending(&s);
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["id"], rq.as_str());
    assert_eq!(list[0]["host"], s.host.as_str());
    assert_eq!(list[0]["guest_name"], guest.as_str());
    assert_eq!(list[0]["volumes"], serde_json::json!(["apr-disk"]));
    assert_eq!(released(&s), 1, "a key went out unapproved");

    // The start is tried again and waits; the operator approves it: it
    // runs, and the approval is used.
    let g = guest.clone();
    let start = std::thread::spawn(move || virsh(&["start", &g]));
    std::thread::sleep(Duration::from_millis(800));
    let r = s.json(&["pending", "approve", &rq, "--note", "ticket 42"]);
    assert_eq!(r["state"], "approved", "{r}");
    start.join().unwrap().unwrap();
    assert_eq!(virsh(&["domstate", &guest]).unwrap().trim(), "running");
    virsh(&["destroy", &guest]).unwrap();
    assert_eq!(released(&s), 2);
    assert!(pending(&s).is_empty());
    let a = audited(&s, "release.approved");
    assert!(a.iter().any(
        |r| r["subject"] == rq.as_str() && r["detail"].as_str().unwrap().contains("ticket 42")
    ));
    let all = s.json(&["pending", "list", "--all"]);
    assert!(
        all.as_array()
            .unwrap()
            .iter()
            .any(|r| r["id"] == rq.as_str() && r["state"] == "used"),
        "{all}"
    );
    // An approved request cannot be decided again.
    let out = s.ctl(&["pending", "deny", &rq]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not pending"));

    // The next start needs a new approval; this one is denied.
    let g = guest.clone();
    let start = std::thread::spawn(move || virsh(&["start", &g]));
    let waiting = {
        let end = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let l = pending(&s);
            if let Some(r) = l.first() {
                break r["id"].as_str().unwrap().to_owned();
            }
            assert!(std::time::Instant::now() < end, "no new request");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    assert_ne!(waiting, rq, "an approval opened two starts");
    s.json(&[
        "pending",
        "deny",
        &waiting,
        "--note",
        "not during the freeze",
    ]);
    let e = start.join().unwrap().unwrap_err().0;
    assert!(
        e.contains("denied by admin:") && e.contains("not during the freeze"),
        "{e}"
    );
    assert_eq!(virsh(&["domstate", &guest]).unwrap().trim(), "shut off");
    assert_eq!(released(&s), 2, "a denied start got a key");

    // Bad input changes nothing.
    let out = s.ctl(&["pending", "approve", "rq-000000000000"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no request rq-000000000000"));
}
