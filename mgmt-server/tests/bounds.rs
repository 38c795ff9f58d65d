//! Bounded retries end to end (issue 15, items 4 and 9), with
//! `common::TestAgent` (a test implementation of the host-agent API, see
//! its header) as the host: a push that can never succeed ends in `failed`
//! with its reason after `retry.max_attempts` attempts, releasing one key
//! per attempt and none after (the unit tests count that over many pusher
//! rounds); the admin retries it explicitly; a guest whose definition
//! the host always refuses ends `failed` in `guest show`; the same volume
//! twice in one guest is refused by name.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;

const FAST: &str = "[retry]\ninitial_delay_ms = 50\nmax_delay_ms = 100\nmax_attempts = 3\n";

#[test]
fn a_volume_push_that_can_never_succeed_ends_failed_and_is_retried_on_request() {
    let s = start_server(Some(FAST));
    let mut a = TestAgent::enroll(&s, "kvm-a");
    a.serve();
    // The wait of `volume create` would report the failure itself; this
    // test follows the server's own bookkeeping instead.
    s.ok(&[
        "volume",
        "create",
        "--no-wait",
        "--host",
        "kvm-a",
        "--pool",
        MISSING_POOL,
        "--name",
        "v",
        "--size",
        "1M",
    ]);
    s.wait_for(20, "the volume failed", || {
        s.json(&["volume", "show", "v"])["state"] == "failed"
    });
    let v = s.json(&["volume", "show", "v"]);
    let why = v["last_error"].as_str().unwrap();
    assert!(
        why.starts_with("create gave up after 3 failed attempts: host kvm-a refused: there is no storage pool missing-pool"),
        "{v}"
    );
    assert_eq!(v["attempts"], 3);
    assert_eq!(s.audit_count("key.released"), 3);
    assert_eq!(s.audit_count("volume.failed"), 1);
    // The admin asks again: it is tried (and fails) again, three times.
    let retried = s.json(&["volume", "retry", "v"]);
    assert_eq!(retried["state"], "pending-create");
    s.wait_for(20, "failed again", || {
        s.json(&["volume", "show", "v"])["state"] == "failed"
    });
    assert_eq!(s.audit_count("key.released"), 6);
    assert_eq!(s.audit_count("volume.retry-requested"), 1);
    // A failed volume can be deleted (its key destroyed once the host
    // confirms).
    s.ok(&["volume", "delete", "v"]);
    s.wait_for(20, "deleted", || {
        s.json(&["volume", "show", retried["id"].as_str().unwrap()])["state"] == "deleted"
    });
    assert!(s.ok(&["audit", "--verify"]).contains("verified"));
}

#[test]
fn a_guest_definition_the_host_always_refuses_ends_failed_and_the_same_volume_twice_is_refused() {
    let s = start_server(Some(FAST));
    let mut a = TestAgent::enroll(&s, "kvm-a");
    a.serve();
    s.ok(&[
        "volume", "create", "--host", "kvm-a", "--pool", "default", "--name", "root", "--size",
        "1M",
    ]);
    s.wait_for(20, "ready", || {
        s.json(&["volume", "show", "root"])["state"] == "ready"
    });
    let disk = |dev: &str| {
        format!(
            "    <disk type='volume' device='disk'>\n      <source pool='default' volume='root'/>\n      <target dev='{dev}'/>\n    </disk>\n"
        )
    };
    let file = s.dir.join("../twice.xml");
    std::fs::write(
        &file,
        format!(
            "<domain type='kvm'>\n  <name>twice</name>\n  <devices>\n{}{}  </devices>\n</domain>\n",
            disk("vda"),
            disk("vdb")
        ),
    )
    .unwrap();
    let before = s.state_snapshot();
    let e = s.fails(&[
        "guest",
        "define",
        "--host",
        "kvm-a",
        "--xml",
        file.to_str().unwrap(),
    ]);
    assert!(
        e.contains("invalid disks \"vda (line 4) and vdb (line 8)\": both use volume root"),
        "{e}"
    );
    assert!(!e.contains("database"), "{e}");
    assert_eq!(s.state_snapshot(), before);

    let released = s.audit_count("key.released");
    std::fs::write(
        &file,
        format!("<domain type='kvm'>\n  <name>{REFUSED_GUEST}</name>\n  <devices>\n{}  </devices>\n</domain>\n", disk("vda")),
    )
    .unwrap();
    s.ok(&[
        "guest",
        "define",
        "--host",
        "kvm-a",
        "--xml",
        file.to_str().unwrap(),
    ]);
    s.wait_for(20, "the guest failed", || {
        s.json(&["guest", "show", REFUSED_GUEST])["state"] == "failed"
    });
    let g = s.json(&["guest", "show", REFUSED_GUEST]);
    assert_eq!(g["pending"], "");
    assert!(
        g["last_error"]
            .as_str()
            .unwrap()
            .starts_with("define gave up after 3 failed attempts: host kvm-a refused: libvirt refused the domain XML"),
        "{g}"
    );
    assert_eq!(s.audit_count("key.released") - released, 3);
    let shown = s.ok(&["guest", "show", REFUSED_GUEST]);
    assert!(
        shown.contains("failed") && shown.contains("gave up"),
        "{shown}"
    );
    // It can be undefined without its host, which has nothing of it.
    s.ok(&["guest", "undefine", REFUSED_GUEST]);
    assert!(s.json(&["guest", "list"]).as_array().unwrap().is_empty());
}
