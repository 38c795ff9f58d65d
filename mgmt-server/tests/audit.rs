//! The audit log against someone who can write the database file but does
//! not hold the master key (issue 15, item 3), end to end with the real
//! server binaries: every class of tampering is found by `audit --verify`,
//! with a message saying what. Also: refused calls add a bounded number of
//! records (item 4). No host is involved.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;

/// Stops the server (it writes a last checkpoint), runs `sql` on its
/// database as an attacker would, starts it again, and returns what
/// `audit --verify` printed; the command must fail.
fn tamper_and_verify(s: &mut TestServer, sql: &str) -> String {
    s.stop();
    {
        let db = rusqlite::Connection::open(s.dir.join("guestkey.db")).unwrap();
        db.execute_batch(sql).unwrap();
    }
    s.restart();
    let out = s.ctl(&["audit", "--verify"]);
    assert!(!out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

const UNTRIGGER: &str = "DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete;";

fn with_records() -> TestServer {
    let s = start_sqlite_server(None);
    for i in 1..=4 {
        s.ok(&[
            "host",
            "add",
            &format!("h{i}"),
            "--address",
            &format!("127.0.0.1:{i}"),
        ]);
    }
    assert!(s.ok(&["audit", "--verify"]).contains("hash chain verified"));
    s
}

fn newest(s: &TestServer) -> (u64, String) {
    let recs = s.json(&["audit", "--limit", "10000"]);
    let last = recs.as_array().unwrap().last().unwrap().clone();
    (
        last["seq"].as_u64().unwrap(),
        last["hash"].as_str().unwrap().to_owned(),
    )
}

#[test]
fn deleting_the_newest_records_and_moving_the_head_is_detected() {
    let mut s = with_records();
    let recs = s.json(&["audit"]);
    let keep = &recs.as_array().unwrap()[1];
    let (kseq, khash) = (
        keep["seq"].as_u64().unwrap(),
        keep["hash"].as_str().unwrap(),
    );
    let out = tamper_and_verify(
        &mut s,
        &format!(
            "{UNTRIGGER} DELETE FROM audit WHERE seq > {kseq};
             UPDATE meta SET value = '{kseq}:{khash}' WHERE key = 'audit_head';"
        ),
    );
    assert!(
        out.contains(&format!("the log ends at record {kseq}, but checkpoint"))
            && out.contains(
                "newest records were deleted, or an older copy of the database was restored"
            ),
        "{out}"
    );
    // The checkpoints are also in the server's log.
    assert!(s.log().contains("audit checkpoint"));
}

#[test]
fn a_chain_rebuilt_without_some_records_is_detected() {
    let mut s = with_records();
    // Rebuild the whole chain from record 1 without record 3: correct hashes,
    // links and head, MACs copied over (the attacker cannot make new ones).
    s.stop();
    let db = rusqlite::Connection::open(s.dir.join("guestkey.db")).unwrap();
    let rows: Vec<(i64, String, String, String, String, String)> = {
        let mut st = db
            .prepare("SELECT time_ms, actor, action, subject, detail, mac FROM audit WHERE seq != 3 ORDER BY seq")
            .unwrap();
        st.query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
    };
    db.execute_batch(&format!("{UNTRIGGER} DELETE FROM audit;"))
        .unwrap();
    let mut prev = "0".repeat(64);
    for (i, (time_ms, actor, action, subject, detail, mac)) in rows.iter().enumerate() {
        let seq = i as u64 + 1;
        let hash = chain_hash(&prev, seq, *time_ms, [actor, action, subject, detail]);
        db.execute(
            "INSERT INTO audit VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            rusqlite::params![
                seq as i64, time_ms, actor, action, subject, detail, prev, hash, mac
            ],
        )
        .unwrap();
        prev = hash;
    }
    db.execute(
        "UPDATE meta SET value = ?1 WHERE key = 'audit_head'",
        [format!("{}:{prev}", rows.len())],
    )
    .unwrap();
    drop(db);
    // Without the checkpoint file too: the MACs alone tell.
    std::fs::remove_file(s.dir.join("audit-checkpoints")).unwrap();
    s.restart();
    let out = s.ctl(&["audit", "--verify"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        text.contains("AUDIT LOG DAMAGED at record 3")
            && text.contains("does not carry this server's MAC: it was written or rewritten without the audit key"),
        "{text}"
    );
}

/// The chain hash as the server computes it (an attacker knows it).
fn chain_hash(prev: &str, seq: u64, time_ms: i64, fields: [&String; 4]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"guestkey audit v1");
    h.update(prev.as_bytes());
    h.update(seq.to_be_bytes());
    h.update(time_ms.to_be_bytes());
    for f in fields {
        h.update((f.len() as u64).to_be_bytes());
        h.update(f.as_bytes());
    }
    hex::encode(h.finalize())
}

#[test]
fn edited_and_deleted_middle_records_are_detected() {
    let mut s = with_records();
    let out = tamper_and_verify(
        &mut s,
        &format!("{UNTRIGGER} UPDATE audit SET detail = 'address 10.9.9.9:1' WHERE seq = 3;"),
    );
    assert!(
        out.contains("AUDIT LOG DAMAGED at record 3: record 3 was changed"),
        "{out}"
    );
    let mut s = with_records();
    let out = tamper_and_verify(
        &mut s,
        &format!("{UNTRIGGER} DELETE FROM audit WHERE seq = 2;"),
    );
    assert!(out.contains("record 2 is missing"), "{out}");
}

#[test]
fn a_restored_older_copy_of_the_database_is_detected_and_a_kept_head_tells_too() {
    let mut s = with_records();
    s.stop();
    let db = s.dir.join("guestkey.db");
    let old = s.dir.join("../old.db");
    std::fs::copy(&db, &old).unwrap();
    s.restart();
    s.ok(&["host", "add", "h9", "--address", "127.0.0.1:9"]);
    // The admin keeps a signed head outside the server (`audit --head`).
    let kept_text = s.ok(&["audit", "--head"]).trim().to_owned();
    assert!(kept_text.starts_with("gkah1:"), "{kept_text}");
    let kept = s.json(&["audit", "--head"]);
    assert_eq!(kept["seq"].as_u64().unwrap(), newest(&s).0);
    let kept_file = s.dir.join("../kept-head");
    std::fs::write(&kept_file, &kept_text).unwrap();
    assert!(
        s.ok(&[
            "audit",
            "--verify",
            "--against",
            &format!("@{}", kept_file.display())
        ])
        .contains("verified")
    );
    s.stop();
    std::fs::copy(&old, &db).unwrap();
    s.restart();
    let out = s.ctl(&["audit", "--verify"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        text.contains("an older copy of the database was restored"),
        "{text}"
    );
    // The server said so at start-up too.
    s.wait_for(10, "the start-up warning", || {
        s.log().contains("THE AUDIT LOG DOES NOT VERIFY")
    });
    // Even with the checkpoint file rolled back as well, the kept head tells.
    std::fs::remove_file(s.dir.join("audit-checkpoints")).unwrap();
    assert!(s.ok(&["audit", "--verify"]).contains("verified"));
    let out = s.ctl(&[
        "audit",
        "--verify",
        "--against",
        &format!("@{}", kept_file.display()),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("the kept head") && text.contains("older copy"),
        "{text}"
    );
    std::fs::remove_file(old).unwrap();
}

#[test]
fn two_hundred_refused_calls_add_a_bounded_number_of_records_that_count_them() {
    let mut s = start_sqlite_server(None);
    let before = s.audit_count("refused");
    block_on(async {
        let ch = common::channel(s.url.clone(), &s.ca_pem(), "localhost", None)
            .await
            .unwrap();
        let mut c = guestkey_proto::admin::admin_client::AdminClient::new(ch);
        for _ in 0..200 {
            let e = c
                .list_hosts(guestkey_proto::admin::ListHostsRequest {})
                .await
                .unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated);
        }
    });
    let while_counting = s.audit_count("refused") - before;
    assert!(
        while_counting <= 3,
        "{while_counting} records for 200 refusals"
    );
    // The server stops: what it only counted is recorded.
    s.restart();
    let recs = s.json(&["audit", "--limit", "10000"]);
    let refused: Vec<&serde_json::Value> = recs
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "refused")
        .collect();
    assert!(refused.len() - before <= 4, "{refused:?}");
    assert!(
        refused.iter().any(|r| r["detail"]
            .as_str()
            .unwrap()
            .starts_with("no client certificate (repeated 197 more times within")),
        "{refused:?}"
    );
    assert!(s.ok(&["audit", "--verify"]).contains("verified"));
}
