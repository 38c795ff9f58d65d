//! Tamper classes against the audit chain, on the SQLite store: what an
//! attacker with the database file but without the master key can do.

use super::*;
use crate::store::sqlite::SqliteStore;
use crate::store::testing::TestStore;
use crate::store::{Access, Store};

/// An attacker with the database file drops the triggers first.
const UNTRIGGER: &str = "DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete;";

fn fill(s: &dyn Store, key: &AuditKey, from: usize, n: usize) {
    let mut tx = s.begin(Access::Write).unwrap();
    for i in from..from + n {
        append(
            &mut *tx,
            key,
            "admin:test",
            "key.created",
            &format!("vol-{i}"),
            "",
        )
        .unwrap();
    }
    tx.commit().unwrap();
}

fn filled() -> (TestStore, AuditKey) {
    let s = TestStore::new();
    let key = AuditKey::generate().unwrap();
    fill(&s, &key, 0, 5);
    assert!(check(&s, &key, &[]).ok);
    (s, key)
}

fn check(s: &dyn Store, key: &AuditKey, heads: &[String]) -> Verification {
    let kept: Vec<KeptHead<'_>> = heads
        .iter()
        .enumerate()
        .map(|(i, text)| KeptHead {
            label: format!("checkpoint {}", i + 1),
            text,
        })
        .collect();
    verify(&mut *s.begin(Access::Read).unwrap(), key, &kept).unwrap()
}

fn signed_head(s: &dyn Store, key: &AuditKey) -> String {
    let (seq, hash) = head(&mut *s.begin(Access::Read).unwrap()).unwrap();
    SignedHead::sign(key, seq, &hash).to_string()
}

/// What an attacker without the audit key can do: rebuild the whole
/// chain from the records it keeps, with correct hashes and the head
/// moved, and MACs copied from the old rows or left out.
fn rebuild_without(s: &TestStore, drop_seq: u64, keep_macs: bool) {
    let old = s.begin(Access::Read).unwrap().list_audit(0, 1000).unwrap();
    let mut sql = format!("{UNTRIGGER} DELETE FROM audit;");
    let mut prev = GENESIS.to_owned();
    let mut seq = 0;
    for r in old.iter().filter(|r| r.seq != drop_seq) {
        seq += 1;
        let hash = record_hash(
            &prev,
            seq,
            r.time_ms,
            [&r.actor, &r.action, &r.subject, &r.detail],
        );
        let mac = if keep_macs { r.mac.as_str() } else { "" };
        sql.push_str(&format!(
            "INSERT INTO audit VALUES ({seq}, {}, '{}', '{}', '{}', '{}', '{prev}', '{hash}', '{mac}');",
            r.time_ms, r.actor, r.action, r.subject, r.detail
        ));
        prev = hash;
    }
    sql.push_str(&format!(
        "UPDATE meta SET value = '{seq}:{prev}' WHERE key = 'audit_head';"
    ));
    s.tamper(&sql).unwrap();
}

#[test]
fn sql_refuses_update_and_delete() {
    let (s, key) = filled();
    let e = s
        .tamper("UPDATE audit SET detail = 'x' WHERE seq = 2")
        .unwrap_err();
    assert!(e.contains("append-only"), "{e}");
    assert!(s.tamper("DELETE FROM audit WHERE seq = 2").is_err());
    assert!(check(&s, &key, &[]).ok);
}

#[test]
fn an_edited_row_is_detected() {
    let (s, key) = filled();
    s.tamper(UNTRIGGER).unwrap();
    s.tamper("UPDATE audit SET subject = 'vol-x' WHERE seq = 3")
        .unwrap();
    let v = check(&s, &key, &[]);
    assert_eq!((v.ok, v.first_bad_seq), (false, 3), "{v:?}");
    assert!(v.problem.contains("record 3 was changed"), "{v:?}");
}

#[test]
fn a_deleted_middle_row_is_detected() {
    let (s, key) = filled();
    s.tamper(UNTRIGGER).unwrap();
    s.tamper("DELETE FROM audit WHERE seq = 2").unwrap();
    let v = check(&s, &key, &[]);
    assert_eq!((v.ok, v.first_bad_seq), (false, 2), "{v:?}");
    assert!(v.problem.contains("record 2 is missing"), "{v:?}");
}

#[test]
fn deleting_the_newest_rows_is_detected_with_or_without_the_head_moved() {
    let (s, key) = filled();
    let kept = signed_head(&s, &key);
    s.tamper(UNTRIGGER).unwrap();
    s.tamper("DELETE FROM audit WHERE seq >= 4").unwrap();
    let v = check(&s, &key, &[]);
    assert!(
        !v.ok && v.problem.contains("newest records were deleted"),
        "{v:?}"
    );
    // The head in meta moved back too: consistent inside the database,
    // caught by the signed head kept outside it.
    let (seq, hash): (u64, String) = {
        let r = s
            .begin(Access::Read)
            .unwrap()
            .audit_record(3)
            .unwrap()
            .unwrap();
        (r.seq, r.hash)
    };
    s.tamper(&format!(
        "UPDATE meta SET value = '{seq}:{hash}' WHERE key = 'audit_head'"
    ))
    .unwrap();
    assert!(
        check(&s, &key, &[]).ok,
        "undetectable from inside the database"
    );
    let v = check(&s, &key, &[kept]);
    assert_eq!((v.ok, v.first_bad_seq), (false, 4), "{v:?}");
    assert!(
        v.problem
            .contains("the log ends at record 3, but checkpoint 1")
            && v.problem
                .contains("saw record 5: newest records were deleted"),
        "{v:?}"
    );
}

#[test]
fn a_chain_rebuilt_without_the_audit_key_is_detected() {
    for keep_macs in [true, false] {
        let (s, key) = filled();
        rebuild_without(&s, 3, keep_macs);
        let v = check(&s, &key, &[]);
        assert!(!v.ok, "{v:?}");
        if keep_macs {
            // Records 1 and 2 are untouched; record 3 is old record 4's
            // content with a new hash: its copied MAC does not match.
            assert_eq!(v.first_bad_seq, 3, "{v:?}");
            assert!(
                v.problem.contains("does not carry this server's MAC"),
                "{v:?}"
            );
        } else {
            assert!(v.problem.contains("no record carries a MAC"), "{v:?}");
        }
    }
    // MACs stripped from the newest records only.
    let (s, key) = filled();
    s.tamper(UNTRIGGER).unwrap();
    s.tamper("UPDATE audit SET mac = '' WHERE seq = 5").unwrap();
    let v = check(&s, &key, &[]);
    assert!(
        v.problem
            .contains("record 5 has no MAC, but records since 1 have"),
        "{v:?}"
    );
}

#[test]
fn records_from_before_macs_are_accepted_only_before_the_first_maced_one() {
    let s = TestStore::new();
    let key = AuditKey::generate().unwrap();
    fill(&s, &key, 0, 3);
    s.tamper(&format!("{UNTRIGGER} UPDATE audit SET mac = ''"))
        .unwrap();
    let v = check(&s, &key, &[]);
    assert!(v.problem.contains("no record carries a MAC"), "{v:?}");
    fill(&s, &key, 3, 2);
    let v = check(&s, &key, &[]);
    assert!(v.ok && v.records == 5, "{v:?}");
}

#[test]
fn a_restored_older_copy_of_the_database_is_detected() {
    let dir = std::env::temp_dir().join(format!("gk-audit-rb-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (db, old) = (dir.join("a.db"), dir.join("old.db"));
    let _ = std::fs::remove_file(&db);
    let key = AuditKey::generate().unwrap();
    let s = SqliteStore::open(&db).unwrap();
    fill(&s, &key, 0, 3);
    drop(s);
    std::fs::copy(&db, &old).unwrap();
    let s = SqliteStore::open(&db).unwrap();
    fill(&s, &key, 3, 4);
    let kept = signed_head(&s, &key);
    drop(s);
    std::fs::copy(&old, &db).unwrap();
    let s = SqliteStore::open(&db).unwrap();
    assert!(check(&s, &key, &[]).ok, "a consistent older log");
    let v = check(&s, &key, std::slice::from_ref(&kept));
    assert!(
        !v.ok
            && v.problem
                .contains("an older copy of the database was restored"),
        "{v:?}"
    );
    // A forged or altered head is refused as such.
    let forged = kept.replacen(":7:", ":9:", 1);
    let v = check(&s, &key, &[forged]);
    assert!(
        v.problem
            .contains("is not signed by this server's audit key"),
        "{v:?}"
    );
    let v = check(&s, &key, &["7:abc".into()]);
    assert!(v.problem.contains("is not an audit head"), "{v:?}");
    drop(s);
    std::fs::remove_dir_all(&dir).unwrap();
}
