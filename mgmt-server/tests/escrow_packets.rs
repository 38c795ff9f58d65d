//! Escrow packets through the real `guestkey-server` and `guestkeyctl`
//! with two named admins, against the protocol-level test agent (it opens
//! the key sealed to it and answers fixed bytes; guestkeyd's real packets
//! are tested with it in `tests/`): the two-person rule, `fetch` into a new
//! 0600 file and never over one, the listing and the audit log.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::*;

#[test]
fn a_second_admin_approves_and_the_packet_is_fetched_into_a_new_private_file() {
    let s = start_server(None);
    let mut a = TestAgent::enroll(&s, "kvm-a");
    a.serve();
    s.ok(&[
        "volume", "create", "--host", "kvm-a", "--pool", "default", "--name", "disk", "--size",
        "1M",
    ]);
    let bob = s.dir.join("bob-credential");
    let out = Command::new(&s.bins.server)
        .args(["admin", "add", "bob", "--out", bob.to_str().unwrap()])
        .args(["--data-dir", s.dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let as_bob = |args: &[&str]| {
        let mut c = s.ctl_command(args);
        c.env("GUESTKEY_ADMIN_DIR", &bob);
        c.output().unwrap()
    };

    let to = age::x25519::Identity::generate().to_public().to_string();
    let said = s.ok(&[
        "volume",
        "escrow",
        "disk",
        "--to",
        &to,
        "--reason",
        "offline copy",
    ]);
    let id = said
        .lines()
        .find_map(|l| l.strip_prefix("id "))
        .unwrap()
        .trim()
        .to_owned();
    assert!(
        said.contains(&format!("guestkeyctl escrow approve {id}")),
        "{said}"
    );
    let e = s.fails(&["escrow", "approve", &id]);
    assert!(
        e.contains("another admin must approve it") && e.contains("guestkey-server admin add"),
        "{e}"
    );
    let file = s.dir.join("disk.escrow");
    let e = s.fails(&["escrow", "fetch", &id, "--out", file.to_str().unwrap()]);
    assert!(e.contains("is pending") && !file.exists(), "{e}");

    let o = as_bob(&["escrow", "approve", &id, "--note", "checked"]);
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && said.contains("current") && said.contains("escrow fetch"),
        "{said}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let list = s.json(&["escrow", "list"]);
    let entry = &list.as_array().unwrap()[0];
    assert_eq!(
        (
            &entry["id"],
            &entry["state"],
            &entry["decided_by"],
            &entry["recipients"][0]
        ),
        (
            &serde_json::json!(id),
            &serde_json::json!("made"),
            &serde_json::json!("admin:bob"),
            &serde_json::json!(to)
        )
    );
    assert!(
        s.ok(&["escrow", "list", "--volume", "disk"])
            .contains("current")
    );

    let said = s.ok(&["escrow", "fetch", &id, "--out", file.to_str().unwrap()]);
    assert!(
        said.contains("guestkey-recover show") && !said.contains("obsolete"),
        "{said}"
    );
    assert_eq!(
        std::fs::read(&file).unwrap(),
        format!("test escrow packet {id}").into_bytes()
    );
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    // Never over an existing file.
    std::fs::write(&file, b"kept").unwrap();
    let e = s.fails(&["escrow", "fetch", &id, "--out", file.to_str().unwrap()]);
    assert!(
        e.contains("exists") && e.contains("does not exist yet"),
        "{e}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"kept");

    let audit = s.json(&["audit", "--limit", "1000"]);
    let actions: Vec<(String, String)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["action"].as_str().unwrap().to_owned(),
                r["actor"].as_str().unwrap().to_owned(),
            )
        })
        .filter(|(a, _)| a.starts_with("escrow."))
        .collect();
    let want = [
        ("escrow.requested", "admin:admin"),
        ("escrow.refused", "admin:admin"),
        ("escrow.made", "admin:bob"),
        ("escrow.fetched", "admin:admin"),
    ];
    assert_eq!(
        actions,
        want.map(|(a, b)| (a.to_owned(), b.to_owned())).to_vec()
    );
    assert!(s.ok(&["audit", "--verify"]).contains("verified"));
}
