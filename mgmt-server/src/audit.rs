//! Append-only, hash-chained audit log.
//!
//! Each record's hash covers the previous record's hash and all its own
//! fields, length-prefixed. The newest sequence number and hash are also
//! kept in `meta` (updated in the same transaction), so that deleting the
//! newest rows is detected too. SQL triggers refuse UPDATE and DELETE.
//!
//! Callers append inside the transaction that does the audited thing: if
//! the record cannot be written, the transaction fails and, for a key
//! release, no key leaves the server (fail closed).

use rusqlite::{Connection, params};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::db::{meta_get, meta_set};

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One audit record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditRecord {
    /// Sequence number, from 1, without gaps.
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub time_ms: i64,
    /// Who: `admin:<name>`, `host:<name>`, `server`, or `unauthenticated`.
    pub actor: String,
    /// What, e.g. `key.created`, `key.released`, `host.enrolled`, `refused`.
    pub action: String,
    /// On what: a volume id, a host name.
    pub subject: String,
    /// Free text; never key material.
    pub detail: String,
    /// Hash of the previous record.
    pub prev_hash: String,
    /// This record's hash.
    pub hash: String,
}

/// Outcome of a chain verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verification {
    /// Whether the whole chain verified.
    pub ok: bool,
    /// Records checked.
    pub records: u64,
    /// First bad record (0 when ok).
    pub first_bad_seq: u64,
    /// What is wrong (empty when ok).
    pub problem: String,
}

fn record_hash(prev: &str, seq: u64, time_ms: i64, fields: [&str; 4]) -> String {
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

/// Appends a record; call inside the transaction of the audited action.
pub fn append(
    conn: &Connection,
    actor: &str,
    action: &str,
    subject: &str,
    detail: &str,
) -> Result<u64, rusqlite::Error> {
    let (prev_seq, prev_hash) = head(conn)?;
    let seq = prev_seq + 1;
    let time_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let hash = record_hash(&prev_hash, seq, time_ms, [actor, action, subject, detail]);
    conn.execute(
        "INSERT INTO audit (seq, time_ms, actor, action, subject, detail, prev_hash, hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            seq as i64, time_ms, actor, action, subject, detail, prev_hash, hash
        ],
    )?;
    meta_set(conn, "audit_head", &format!("{seq}:{hash}"))?;
    Ok(seq)
}

/// Newest (seq, hash) as recorded in `meta`, or (0, genesis).
fn head(conn: &Connection) -> Result<(u64, String), rusqlite::Error> {
    Ok(match meta_get(conn, "audit_head")? {
        Some(h) => match h.split_once(':') {
            Some((s, hash)) => (s.parse().unwrap_or(0), hash.to_owned()),
            None => (0, GENESIS.to_owned()),
        },
        None => (0, GENESIS.to_owned()),
    })
}

/// Records after `after_seq`, oldest first, at most `limit`.
pub fn list(
    conn: &Connection,
    after_seq: u64,
    limit: u32,
) -> Result<Vec<AuditRecord>, rusqlite::Error> {
    let mut stmt = conn.prepare(
        "SELECT seq, time_ms, actor, action, subject, detail, prev_hash, hash
         FROM audit WHERE seq > ?1 ORDER BY seq LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![after_seq as i64, limit], |r| {
        Ok(AuditRecord {
            seq: r.get::<_, i64>(0)? as u64,
            time_ms: r.get(1)?,
            actor: r.get(2)?,
            action: r.get(3)?,
            subject: r.get(4)?,
            detail: r.get(5)?,
            prev_hash: r.get(6)?,
            hash: r.get(7)?,
        })
    })?;
    rows.collect()
}

/// Walks the whole chain.
pub fn verify(conn: &Connection) -> Result<Verification, rusqlite::Error> {
    let bad = |records, seq, problem: String| Verification {
        ok: false,
        records,
        first_bad_seq: seq,
        problem,
    };
    let mut prev_hash = GENESIS.to_owned();
    let mut expected_seq = 1u64;
    let mut after = 0;
    loop {
        let batch = list(conn, after, 1000)?;
        if batch.is_empty() {
            break;
        }
        for r in &batch {
            if r.seq != expected_seq {
                return Ok(bad(
                    r.seq - 1,
                    expected_seq,
                    format!("record {expected_seq} is missing (next is {})", r.seq),
                ));
            }
            if r.prev_hash != prev_hash {
                return Ok(bad(
                    r.seq - 1,
                    r.seq,
                    format!("record {} does not link to record {}", r.seq, r.seq - 1),
                ));
            }
            let h = record_hash(
                &r.prev_hash,
                r.seq,
                r.time_ms,
                [&r.actor, &r.action, &r.subject, &r.detail],
            );
            if h != r.hash {
                return Ok(bad(
                    r.seq - 1,
                    r.seq,
                    format!("record {} was changed after it was written", r.seq),
                ));
            }
            prev_hash = r.hash.clone();
            expected_seq += 1;
            after = r.seq;
        }
    }
    let records = expected_seq - 1;
    let (head_seq, head_hash) = head(conn)?;
    if head_seq != records || (records > 0 && head_hash != prev_hash) {
        return Ok(bad(
            records,
            records + 1,
            format!(
                "the log ends at record {records}, but record {head_seq} was written: newest records were deleted"
            ),
        ));
    }
    Ok(Verification {
        ok: true,
        records,
        first_bad_seq: 0,
        problem: String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> Connection {
        let dir =
            std::env::temp_dir().join(format!("gk-audit-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        crate::db::open(&dir.join("a.db")).unwrap()
    }

    fn rand_suffix() -> u64 {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).unwrap();
        u64::from_le_bytes(b)
    }

    fn filled() -> Connection {
        let c = db();
        for i in 0..5 {
            append(&c, "admin:test", "key.created", &format!("vol-{i}"), "").unwrap();
        }
        assert!(verify(&c).unwrap().ok);
        c
    }

    #[test]
    fn sql_refuses_update_and_delete() {
        let c = filled();
        let e = c
            .execute("UPDATE audit SET detail = 'x' WHERE seq = 2", [])
            .unwrap_err();
        assert!(e.to_string().contains("append-only"), "{e}");
        assert!(c.execute("DELETE FROM audit WHERE seq = 2", []).is_err());
    }

    #[test]
    fn changed_deleted_and_truncated_rows_are_detected() {
        // An attacker with the file drops the triggers first.
        let untrigger = |c: &Connection| {
            c.execute_batch("DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete;")
                .unwrap();
        };
        let c = filled();
        untrigger(&c);
        c.execute("UPDATE audit SET subject = 'vol-x' WHERE seq = 3", [])
            .unwrap();
        let v = verify(&c).unwrap();
        assert_eq!((v.ok, v.first_bad_seq), (false, 3), "{v:?}");
        assert!(v.problem.contains("changed"), "{v:?}");

        let c = filled();
        untrigger(&c);
        c.execute("DELETE FROM audit WHERE seq = 2", []).unwrap();
        let v = verify(&c).unwrap();
        assert_eq!((v.ok, v.first_bad_seq), (false, 2), "{v:?}");

        let c = filled();
        untrigger(&c);
        c.execute("DELETE FROM audit WHERE seq = 5", []).unwrap();
        let v = verify(&c).unwrap();
        assert!(!v.ok && v.problem.contains("deleted"), "{v:?}");
    }
}
