//! The console's logins: hashed, checked, replaced, removed, audited; bad
//! names and passwords refused with nothing changed.

use super::Bed;
use crate::model::{Caller, CoreError};

#[test]
fn console_logins_are_checked_against_their_hash_only() {
    let b = Bed::new();
    b.core
        .set_console_user(&b.admin, "alice", "first password!")
        .unwrap();
    let ok = b
        .core
        .check_console_login("alice", "first password!")
        .unwrap();
    let (caller, tag) = ok.unwrap();
    assert_eq!(caller, Caller::Admin("alice@console".into()));
    assert_eq!(b.core.console_login_tag("alice").unwrap(), Some(tag));
    for (name, pw) in [
        ("alice", "first password"),
        ("bob", "first password!"),
        ("bad name", "first password!"),
        ("", ""),
    ] {
        assert_eq!(
            b.core.check_console_login(name, pw).unwrap(),
            None,
            "{name}"
        );
    }
    // The store keeps an argon2id hash, not the password.
    let users = b.core.console_users().unwrap();
    assert_eq!(users.len(), 1);
    assert_eq!(users[0].2, "admin:admin");
    let snapshot = format!("{:?}", b.core.audit_of("alice", 100).unwrap());
    assert!(!snapshot.contains("first password"), "{snapshot}");

    // A new password replaces the old one.
    b.core
        .set_console_user(&b.admin, "alice", "second password")
        .unwrap();
    assert_eq!(
        b.core
            .check_console_login("alice", "first password!")
            .unwrap(),
        None
    );
    let (_, new_tag) = b
        .core
        .check_console_login("alice", "second password")
        .unwrap()
        .unwrap();
    assert_ne!(
        new_tag, tag,
        "a session of the old password no longer matches"
    );

    // Bad requests change nothing.
    let before = b.core.console_users().unwrap();
    for (name, pw, says) in [
        ("alice", "short", "12 to 1024 characters"),
        ("alice", "with a bell \u{7} in it", "no control characters"),
        ("-alice", "long enough password", "login name"),
    ] {
        let e = b.core.set_console_user(&b.admin, name, pw).unwrap_err();
        assert!(e.to_string().contains(says), "{e}");
        assert!(!e.to_string().contains(pw) || pw.len() < 6, "{e}");
    }
    assert_eq!(b.core.console_users().unwrap(), before);

    b.core.remove_console_user(&b.admin, "alice").unwrap();
    assert!(!b.core.console_user_exists("alice").unwrap());
    let e = b.core.remove_console_user(&b.admin, "alice").unwrap_err();
    assert!(matches!(e, CoreError::NotFound(_)), "{e}");
    let actions = b.actions();
    assert_eq!(
        actions
            .iter()
            .filter(|a| a.starts_with("console-user."))
            .count(),
        3,
        "{actions:?}"
    );
}

#[test]
fn console_sessions_end_when_idle_old_or_their_password_changes() {
    let b = Bed::new();
    b.core
        .set_console_user(&b.admin, "alice", "first password!")
        .unwrap();
    let (_, tag) = b
        .core
        .check_console_login("alice", "first password!")
        .unwrap()
        .unwrap();
    let now = crate::domain::now_unix_ms();
    let session = |hash: u8, started_ms: i64| crate::store::ConsoleSession {
        token_hash: vec![hash; 32],
        login: "alice".into(),
        tag: tag.to_vec(),
        csrf: format!("csrf-{hash}"),
        started_ms,
        last_ms: started_ms,
    };
    let hour = 3_600_000;
    b.core
        .open_console_session(&session(1, now), hour, 12 * hour, 1000)
        .unwrap();
    let got = b
        .core
        .console_session_check(&[1; 32], hour, 12 * hour)
        .unwrap();
    assert_eq!(got, Some(("alice".into(), "csrf-1".into())));
    assert_eq!(
        b.core
            .console_session_check(&[9; 32], hour, 12 * hour)
            .unwrap(),
        None
    );
    // Idle too long, or signed in too long ago: ended (and gone).
    b.core
        .open_console_session(&session(2, now - 2 * hour), 3 * hour, 12 * hour, 1000)
        .unwrap();
    assert_eq!(
        b.core
            .console_session_check(&[2; 32], hour, 12 * hour)
            .unwrap(),
        None
    );
    assert_eq!(
        b.core
            .console_session_check(&[2; 32], 3 * hour, 12 * hour)
            .unwrap(),
        None,
        "an ended session stays ended"
    );
    assert_eq!(
        b.core.console_session_check(&[1; 32], hour, 0).unwrap(),
        None
    );
    // Kept at most `keep`: the least recently used goes.
    for h in 3..=5 {
        b.core
            .open_console_session(&session(h, now + i64::from(h)), hour, 12 * hour, 2)
            .unwrap();
    }
    assert_eq!(
        b.core
            .console_session_check(&[3; 32], hour, 12 * hour)
            .unwrap(),
        None
    );
    assert!(
        b.core
            .console_session_check(&[5; 32], hour, 12 * hour)
            .unwrap()
            .is_some()
    );
    // A new password ends the sessions of the old one.
    b.core
        .set_console_user(&b.admin, "alice", "second password")
        .unwrap();
    assert_eq!(
        b.core
            .console_session_check(&[5; 32], hour, 12 * hour)
            .unwrap(),
        None
    );
    b.core.close_console_session(&[4; 32]).unwrap();
}
