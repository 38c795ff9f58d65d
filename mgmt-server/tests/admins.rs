//! Named admin credentials (`guestkey-server admin add|list|remove`) on a
//! running server: a new credential works with guestkeyctl and is audited
//! by its name; a removed one is refused at once; the last one, a taken
//! name, a bad name and an existing directory are refused with nothing
//! changed.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::process::{Command, Output};

use common::*;

fn admin(s: &TestServer, args: &[&str]) -> Output {
    Command::new(&s.bins.server)
        .arg("admin")
        .args(args)
        .args(["--data-dir", s.dir.to_str().unwrap()])
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn named_admin_credentials_are_added_audited_and_removed() {
    let s = start_server(None);
    let bob = s.dir.join("bob-credential");
    let out = admin(&s, &["add", "bob", "--out", bob.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    for f in ["admin.pem", "admin.key", "ca.pem", "server.sha256"] {
        assert!(bob.join(f).exists(), "{f}");
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(bob.join("admin.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "the key is private: {mode:o}");

    // guestkeyctl acts as bob with it; the audit log says so.
    let as_bob = |args: &[&str]| {
        let mut c = s.ctl_command(args);
        c.env("GUESTKEY_ADMIN_DIR", &bob);
        c.output().unwrap()
    };
    let o = as_bob(&["host", "add", "kvm-bob", "--address", "127.0.0.1:7999"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let audit = s.json(&["audit", "--limit", "1000"]);
    let recs = audit.as_array().unwrap();
    assert!(
        recs.iter()
            .any(|r| r["action"] == "host.added" && r["actor"] == "admin:bob"),
        "{audit}"
    );
    assert!(
        recs.iter()
            .any(|r| r["action"] == "admin.added" && r["subject"] == "bob")
    );
    let list = String::from_utf8_lossy(&admin(&s, &["list"]).stdout).into_owned();
    assert!(list.contains("admin ") && list.contains("bob "), "{list}");

    // Refusals change nothing.
    let before = String::from_utf8_lossy(&admin(&s, &["list"]).stdout).into_owned();
    let other = s.dir.join("other");
    for (args, says) in [
        (
            vec!["add", "bob", "--out", other.to_str().unwrap()],
            "named bob exists",
        ),
        (
            vec!["add", "bad name", "--out", other.to_str().unwrap()],
            "admin name",
        ),
        (
            vec!["add", "carol", "--out", bob.to_str().unwrap()],
            "exists",
        ),
        (vec!["remove", "nobody"], "no admin credential named nobody"),
    ] {
        let o = admin(&s, &args);
        assert!(!o.status.success(), "{args:?}");
        assert!(stderr(&o).contains(says), "{args:?}: {}", stderr(&o));
    }
    assert!(!other.exists());
    assert_eq!(
        String::from_utf8_lossy(&admin(&s, &["list"]).stdout),
        before
    );

    // Removed: bob's certificate is refused at once; the last one stays.
    let o = admin(&s, &["remove", "bob"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = as_bob(&["host", "list"]);
    assert!(!o.status.success(), "a removed credential still works");
    let o = admin(&s, &["remove", "admin"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("only admin credential"),
        "{}",
        stderr(&o)
    );
    s.ok(&["host", "list"]);
}
