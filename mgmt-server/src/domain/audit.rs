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

use sha2::{Digest, Sha256};

use crate::domain::Core;
use crate::model::{AuditRecord, CoreError, StoreError, Verification};
use crate::store::Tx;

/// The `prev_hash` of record 1.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

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
    tx: &mut dyn Tx,
    actor: &str,
    action: &str,
    subject: &str,
    detail: &str,
) -> Result<u64, StoreError> {
    let (prev_seq, prev_hash) = head(tx)?;
    let seq = prev_seq + 1;
    let time_ms = crate::domain::now_unix_ms();
    let hash = record_hash(&prev_hash, seq, time_ms, [actor, action, subject, detail]);
    tx.append_audit(&AuditRecord {
        seq,
        time_ms,
        actor: actor.to_owned(),
        action: action.to_owned(),
        subject: subject.to_owned(),
        detail: detail.to_owned(),
        prev_hash,
        hash,
    })?;
    Ok(seq)
}

/// Newest (seq, hash) as recorded beside the log, or (0, genesis).
fn head(tx: &mut dyn Tx) -> Result<(u64, String), StoreError> {
    Ok(tx.audit_head()?.unwrap_or_else(|| (0, GENESIS.to_owned())))
}

/// Walks the whole chain.
pub fn verify(tx: &mut dyn Tx) -> Result<Verification, StoreError> {
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
        let batch = tx.list_audit(after, 1000)?;
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
    let (head_seq, head_hash) = head(tx)?;
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

impl Core {
    /// Records after `after_seq`, oldest first, at most `limit`.
    pub fn list_audit(&self, after_seq: u64, limit: u32) -> Result<Vec<AuditRecord>, CoreError> {
        self.read(|tx| Ok(tx.list_audit(after_seq, limit)?))
    }

    /// Walks the whole audit chain.
    pub fn verify_audit(&self) -> Result<Verification, CoreError> {
        self.read(|tx| Ok(verify(tx)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use crate::store::sqlite::SqliteStore;

    fn filled() -> SqliteStore {
        let s = SqliteStore::in_memory().unwrap();
        let mut tx = s.begin(crate::store::Access::Write).unwrap();
        for i in 0..5 {
            append(
                &mut *tx,
                "admin:test",
                "key.created",
                &format!("vol-{i}"),
                "",
            )
            .unwrap();
        }
        tx.commit().unwrap();
        assert!(check(&s).ok);
        s
    }

    fn check(s: &SqliteStore) -> Verification {
        verify(&mut *s.begin(crate::store::Access::Read).unwrap()).unwrap()
    }

    #[test]
    fn sql_refuses_update_and_delete() {
        let s = filled();
        let e = s
            .tamper("UPDATE audit SET detail = 'x' WHERE seq = 2")
            .unwrap_err();
        assert!(e.contains("append-only"), "{e}");
        assert!(s.tamper("DELETE FROM audit WHERE seq = 2").is_err());
        assert!(check(&s).ok);
    }

    #[test]
    fn changed_deleted_and_truncated_rows_are_detected() {
        // An attacker with the file drops the triggers first.
        const UNTRIGGER: &str = "DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete;";
        let s = filled();
        s.tamper(UNTRIGGER).unwrap();
        s.tamper("UPDATE audit SET subject = 'vol-x' WHERE seq = 3")
            .unwrap();
        let v = check(&s);
        assert_eq!((v.ok, v.first_bad_seq), (false, 3), "{v:?}");
        assert!(v.problem.contains("changed"), "{v:?}");

        let s = filled();
        s.tamper(UNTRIGGER).unwrap();
        s.tamper("DELETE FROM audit WHERE seq = 2").unwrap();
        let v = check(&s);
        assert_eq!((v.ok, v.first_bad_seq), (false, 2), "{v:?}");

        let s = filled();
        s.tamper(UNTRIGGER).unwrap();
        s.tamper("DELETE FROM audit WHERE seq = 5").unwrap();
        let v = check(&s);
        assert!(!v.ok && v.problem.contains("deleted"), "{v:?}");
    }
}
