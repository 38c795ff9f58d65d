//! Append-only, hash-chained, MACed audit log, and its signed heads.
//!
//! Each record's hash covers the previous record's hash and all its own
//! fields, length-prefixed; its MAC (HMAC-SHA256 under the audit key, see
//! [`crate::masterkey::AuditKey`]) covers its sequence number and hash. The
//! audit key is kept in the database only wrapped under the master key, so
//! someone who can write the database but lacks the master key can neither
//! change a record nor rebuild the chain without some: the MACs would not
//! verify. Records written before MACs existed are accepted only before the
//! first MACed one (the server appends `audit.mac-enabled` when it first
//! runs on an old database), and a log with no MACed record fails.
//!
//! The newest sequence number and hash are also kept in `meta` (updated in
//! the same transaction). Truncation (newest rows deleted and the head moved
//! back) and a restored older copy of the database leave a consistent,
//! MACed chain; they are caught by signed heads kept outside the database
//! ([`SignedHead`]): the checkpoints the server writes to
//! `DATA_DIR/audit-checkpoints` and to its log, and heads admins fetch and
//! keep. [`verify`] checks the log against all of them. SQL triggers refuse
//! UPDATE and DELETE.
//!
//! Callers append inside the transaction that does the audited thing: if
//! the record cannot be written, the transaction fails and, for a key
//! release, no key leaves the server (fail closed).
//!
//! May import: `model`, the store traits, `masterkey`. Imported by the
//! rest of `domain`, `init` and the master key rotation.

use sha2::{Digest, Sha256};

use crate::domain::Core;
use crate::masterkey::{AuditKey, MasterKey};
use crate::model::{AuditRecord, CoreError, StoreError, Verification};
use crate::store::{Tx, WrappedKey};

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

/// A record's MAC: its seq and hash under the audit key.
fn record_mac_parts(seq: u64, hash: &str) -> [Vec<u8>; 3] {
    [
        b"guestkey audit mac v1".to_vec(),
        seq.to_be_bytes().to_vec(),
        hash.as_bytes().to_vec(),
    ]
}

fn parts(p: &[Vec<u8>]) -> Vec<&[u8]> {
    p.iter().map(Vec::as_slice).collect()
}

/// Appends a record, MACed under `key`; call inside the transaction of the
/// audited action.
pub fn append(
    tx: &mut dyn Tx,
    key: &AuditKey,
    actor: &str,
    action: &str,
    subject: &str,
    detail: &str,
) -> Result<u64, StoreError> {
    let (prev_seq, prev_hash) = head(tx)?;
    let seq = prev_seq + 1;
    let time_ms = crate::domain::now_unix_ms();
    let hash = record_hash(&prev_hash, seq, time_ms, [actor, action, subject, detail]);
    let mac = key.mac(&parts(&record_mac_parts(seq, &hash)));
    tx.append_audit(&AuditRecord {
        seq,
        time_ms,
        actor: actor.to_owned(),
        action: action.to_owned(),
        subject: subject.to_owned(),
        detail: detail.to_owned(),
        prev_hash,
        hash,
        mac,
    })?;
    Ok(seq)
}

/// Newest (seq, hash) as recorded beside the log, or (0, genesis).
pub(crate) fn head(tx: &mut dyn Tx) -> Result<(u64, String), StoreError> {
    Ok(tx.audit_head()?.unwrap_or_else(|| (0, GENESIS.to_owned())))
}

/// The audit key of the database under `master`: the stored one, or a new
/// one (stored wrapped, and, on a log written before MACs, announced by a
/// MACed `audit.mac-enabled` record that anchors the older records).
pub(crate) fn ensure_key(tx: &mut dyn Tx, master: &MasterKey) -> Result<AuditKey, CoreError> {
    if let Some(w) = tx.audit_key()? {
        return master
            .unwrap_audit_key(&w.master_key_id, &w.wrapped)
            .map_err(|e| CoreError::Internal(e.to_string()));
    }
    let key = AuditKey::generate()?;
    let wrapped = WrappedKey {
        master_key_id: master.id().to_owned(),
        wrapped: master.wrap_audit_key(&key),
    };
    tx.put_audit_key(&wrapped, crate::domain::now_unix())?;
    let (records, _) = head(tx)?;
    if records > 0 {
        append(
            tx,
            &key,
            "server",
            "audit.mac-enabled",
            "",
            &format!("records 1 to {records} predate MACs; every record from here on is MACed"),
        )?;
    }
    Ok(key)
}

/// A head of the log, signed with the audit key: `gkah1:SEQ:HASH:TIME_MS:MAC`.
/// Kept outside the database (checkpoint file, server log, the admin), it
/// shows later whether the log still holds that record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedHead {
    /// Newest record then.
    pub seq: u64,
    /// Its hash.
    pub hash: String,
    /// When signed (ms since the Unix epoch).
    pub time_ms: i64,
    /// HMAC of the above under the audit key (hex).
    pub mac: String,
}

impl SignedHead {
    fn mac_parts(seq: u64, hash: &str, time_ms: i64) -> [Vec<u8>; 4] {
        [
            b"guestkey audit head v1".to_vec(),
            seq.to_be_bytes().to_vec(),
            hash.as_bytes().to_vec(),
            time_ms.to_be_bytes().to_vec(),
        ]
    }

    /// Signs (seq, hash) now.
    pub fn sign(key: &AuditKey, seq: u64, hash: &str) -> Self {
        let time_ms = crate::domain::now_unix_ms();
        Self {
            seq,
            hash: hash.to_owned(),
            time_ms,
            mac: key.mac(&parts(&Self::mac_parts(seq, hash, time_ms))),
        }
    }

    /// Whether `key` signed it.
    pub fn verify(&self, key: &AuditKey) -> bool {
        key.verify(
            &parts(&Self::mac_parts(self.seq, &self.hash, self.time_ms)),
            &self.mac,
        )
    }
}

impl std::fmt::Display for SignedHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "gkah1:{}:{}:{}:{}",
            self.seq, self.hash, self.time_ms, self.mac
        )
    }
}

impl std::str::FromStr for SignedHead {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let f: Vec<&str> = s.trim().split(':').collect();
        let hex64 = |v: &str| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit());
        match f.as_slice() {
            ["gkah1", seq, hash, time, mac] if hex64(hash) && hex64(mac) => Ok(Self {
                seq: seq
                    .parse()
                    .map_err(|_| "its sequence number is not a number")?,
                hash: (*hash).to_owned(),
                time_ms: time.parse().map_err(|_| "its time is not a number")?,
                mac: (*mac).to_owned(),
            }),
            _ => Err(
                "expected gkah1:SEQ:HASH:TIME_MS:MAC as `guestkeyctl audit head` prints it".into(),
            ),
        }
    }
}

/// A signed head to check the log against, and what to call it in messages.
pub struct KeptHead<'a> {
    /// e.g. "checkpoint 3 of DATA_DIR/audit-checkpoints", "the kept head".
    pub label: String,
    /// Its text.
    pub text: &'a str,
}

fn bad(records: u64, seq: u64, problem: String, checkpoints: u64) -> Verification {
    Verification {
        ok: false,
        records,
        first_bad_seq: seq,
        problem,
        checkpoints,
    }
}

/// `2026-12-01 08:30:00Z`, for messages.
fn fmt_time(ms: i64) -> String {
    crate::model::names::format_utc(ms.div_euclid(1000)).unwrap_or_else(|| format!("{ms} ms"))
}

/// Checks one signed head against a log of `records` records: None if the
/// log still holds the record it saw, else the first bad seq and why.
pub(crate) fn check_head(
    tx: &mut dyn Tx,
    key: &AuditKey,
    records: u64,
    h: &KeptHead<'_>,
) -> Result<Option<(u64, String)>, StoreError> {
    let head: SignedHead = match h.text.parse() {
        Ok(head) => head,
        Err(why) => {
            return Ok(Some((
                0,
                format!("{} is not an audit head: {why}", h.label),
            )));
        }
    };
    if !head.verify(key) {
        let why = format!(
            "{} is not signed by this server's audit key: it was forged or altered",
            h.label
        );
        return Ok(Some((0, why)));
    }
    let when = fmt_time(head.time_ms);
    if head.seq > records {
        let why = format!(
            "the log ends at record {records}, but {} (signed {when}) saw record {}: newest records were deleted, or an older copy of the database was restored",
            h.label, head.seq
        );
        return Ok(Some((records + 1, why)));
    }
    let same = head.seq == 0
        || tx
            .audit_record(head.seq)?
            .is_some_and(|r| r.hash == head.hash);
    if !same {
        let why = format!(
            "record {} is not the one {} (signed {when}) saw: the log was rewritten",
            head.seq, h.label
        );
        return Ok(Some((head.seq, why)));
    }
    Ok(None)
}

/// Walks the whole chain (hashes, links, MACs under `key`), then checks it
/// against the head in `meta` and against every signed head in `heads`.
pub fn verify(
    tx: &mut dyn Tx,
    key: &AuditKey,
    heads: &[KeptHead<'_>],
) -> Result<Verification, StoreError> {
    let mut prev_hash = GENESIS.to_owned();
    let mut expected_seq = 1u64;
    let mut after = 0;
    let mut macs_from: Option<u64> = None;
    loop {
        let batch = tx.list_audit(after, 1000)?;
        if batch.is_empty() {
            break;
        }
        for r in &batch {
            let seen = r.seq.saturating_sub(1);
            if r.seq != expected_seq {
                let why = format!("record {expected_seq} is missing (next is {})", r.seq);
                return Ok(bad(seen, expected_seq, why, 0));
            }
            if r.prev_hash != prev_hash {
                let why = format!("record {} does not link to record {}", r.seq, r.seq - 1);
                return Ok(bad(seen, r.seq, why, 0));
            }
            let fields = [r.actor.as_str(), &r.action, &r.subject, &r.detail];
            if record_hash(&r.prev_hash, r.seq, r.time_ms, fields) != r.hash {
                let why = format!("record {} was changed after it was written", r.seq);
                return Ok(bad(seen, r.seq, why, 0));
            }
            if r.mac.is_empty() {
                if let Some(from) = macs_from {
                    let why = format!(
                        "record {} has no MAC, but records since {from} have: it was written or rewritten without the audit key",
                        r.seq
                    );
                    return Ok(bad(seen, r.seq, why, 0));
                }
            } else if key.verify(&parts(&record_mac_parts(r.seq, &r.hash)), &r.mac) {
                macs_from.get_or_insert(r.seq);
            } else {
                let why = format!(
                    "record {} does not carry this server's MAC: it was written or rewritten without the audit key",
                    r.seq
                );
                return Ok(bad(seen, r.seq, why, 0));
            }
            prev_hash = r.hash.clone();
            expected_seq += 1;
            after = r.seq;
        }
    }
    let records = expected_seq - 1;
    if records > 0 && macs_from.is_none() {
        let why = "no record carries a MAC: the log was rewritten without the audit key".into();
        return Ok(bad(records, 1, why, 0));
    }
    let (head_seq, head_hash) = head(tx)?;
    if head_seq != records || (records > 0 && head_hash != prev_hash) {
        let why = format!(
            "the log ends at record {records}, but record {head_seq} was written: newest records were deleted"
        );
        return Ok(bad(records, records + 1, why, 0));
    }
    let mut checked = 0;
    for h in heads {
        if let Some((seq, why)) = check_head(tx, key, records, h)? {
            return Ok(bad(records, seq, why, checked));
        }
        checked += 1;
    }
    Ok(Verification {
        ok: true,
        records,
        first_bad_seq: 0,
        problem: String::new(),
        checkpoints: checked,
    })
}

impl Core {
    /// Records after `after_seq`, oldest first, at most `limit`.
    pub fn list_audit(&self, after_seq: u64, limit: u32) -> Result<Vec<AuditRecord>, CoreError> {
        self.read(|tx| Ok(tx.list_audit(after_seq, limit)?))
    }

    /// Appends a record in `tx`, MACed under the audit key.
    pub(crate) fn log(
        &self,
        tx: &mut dyn Tx,
        actor: &str,
        action: &str,
        subject: &str,
        detail: &str,
    ) -> Result<u64, CoreError> {
        let key = self.keys.audit_key(tx)?;
        Ok(append(tx, &key, actor, action, subject, detail)?)
    }
}

#[cfg(test)]
mod tests;
