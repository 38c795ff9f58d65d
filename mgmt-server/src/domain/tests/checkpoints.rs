//! Audit checkpoints outside the database, and heads the admin keeps.

use super::Bed;

fn temp_dir() -> std::path::PathBuf {
    let mut b = [0u8; 6];
    getrandom::fill(&mut b).unwrap();
    let d = std::env::temp_dir().join(format!("gk-cp-{}-{}", std::process::id(), hex::encode(b)));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn checkpoints_and_a_kept_head_catch_a_truncated_log() {
    let dir = temp_dir();
    let file = dir.join("audit-checkpoints");
    let b = Bed::with_checkpoints(file.clone());
    b.host("kvm-a");
    // Nothing written yet: the scheduler writes when the log grew.
    assert!(!file.exists());
    b.core.checkpoint_audit(true).unwrap();
    b.host("kvm-b");
    // The admin fetches a head to keep; it is a checkpoint too.
    let kept = b.core.audit_head().unwrap().to_string();
    // Not again while nothing changed.
    b.core.checkpoint_audit(true).unwrap();
    let lines = std::fs::read_to_string(&file).unwrap();
    assert_eq!(lines.lines().count(), 2, "{lines}");
    assert_eq!(lines.lines().last(), Some(kept.as_str()));
    let v = b.core.verify_audit(Some(&kept)).unwrap();
    assert!(v.ok, "{v:?}");
    assert_eq!(v.checkpoints, 3);

    // The newest records deleted and the head moved back: consistent
    // inside the database, behind its checkpoints.
    let (seq, hash) = {
        let r = b.core.list_audit(0, 10_000).unwrap();
        let keep = &r[1];
        (keep.seq, keep.hash.clone())
    };
    b.store
        .tamper(&format!(
            "DROP TRIGGER audit_no_delete; DELETE FROM audit WHERE seq > {seq};
             UPDATE meta SET value = '{seq}:{hash}' WHERE key = 'audit_head';"
        ))
        .unwrap();
    let v = b.core.verify_audit(None).unwrap();
    assert!(!v.ok, "{v:?}");
    assert!(
        v.problem.contains(&format!(
            "the log ends at record {seq}, but checkpoint 2 of"
        )) && v
            .problem
            .contains("newest records were deleted, or an older copy of the database was restored"),
        "{v:?}"
    );
    // Without the file (an attacker removed it too) the kept head still
    // tells.
    std::fs::remove_file(&file).unwrap();
    assert!(b.core.verify_audit(None).unwrap().ok);
    let v = b.core.verify_audit(Some(&kept)).unwrap();
    assert!(!v.ok && v.problem.contains("the kept head"), "{v:?}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_kept_head_of_another_server_or_altered_is_refused() {
    let a = Bed::new();
    let b = Bed::new();
    let theirs = b.core.audit_head().unwrap().to_string();
    let v = a.core.verify_audit(Some(&theirs)).unwrap();
    assert!(
        v.problem
            .contains("is not signed by this server's audit key"),
        "{v:?}"
    );
    let mine = a.core.audit_head().unwrap();
    let altered = format!(
        "gkah1:{}:{}:{}:{}",
        mine.seq + 1,
        mine.hash,
        mine.time_ms,
        mine.mac
    );
    let v = a.core.verify_audit(Some(&altered)).unwrap();
    assert!(v.problem.contains("is not signed"), "{v:?}");
    assert!(a.core.verify_audit(Some(&mine.to_string())).unwrap().ok);
}
