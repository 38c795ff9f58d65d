//! `meta`, `admins` and `audit`.

use super::{Row, SqlTx, signed, unsigned};
use crate::model::AuditRecord;
use crate::store::{AuditStore, MetaStore, Result, WrappedKey};

const AUDIT_COLUMNS: &str = "seq, time_ms, actor, action, subject, detail, prev_hash, hash, mac";

fn audit_row(r: &Row) -> Result<AuditRecord> {
    Ok(AuditRecord {
        seq: unsigned(r, 0)?,
        time_ms: r.get(1)?,
        actor: r.get(2)?,
        action: r.get(3)?,
        subject: r.get(4)?,
        detail: r.get(5)?,
        prev_hash: r.get(6)?,
        hash: r.get(7)?,
        mac: r.get(8)?,
    })
}

impl SqlTx<'_> {
    /// `meta`'s row `key`: the whole table (a few rows) is read at the
    /// first look and kept for the transaction ([`SqlTx`]).
    fn meta_get(&mut self, key: &str) -> Result<Option<String>> {
        if self.meta.is_none() {
            let rows: Vec<(String, String)> =
                self.db.query_all("SELECT key, value FROM meta", (), |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?;
            self.meta = Some(rows.into_iter().collect());
        }
        Ok(self.meta.as_ref().and_then(|m| m.get(key).cloned()))
    }

    /// Sets `key`; the audit head only at commit ([`SqlTx`]).
    fn meta_set(&mut self, key: &str, value: &str) -> Result<()> {
        self.meta_get(key)?;
        if let Some(m) = self.meta.as_mut() {
            m.insert(key.to_owned(), value.to_owned());
        }
        if key == AUDIT_HEAD {
            self.head = Some(value.to_owned());
            return Ok(());
        }
        self.db.execute(META_SET, [key, value])?;
        Ok(())
    }
}

/// Sets one `meta` row: `$1` key, `$2` value.
pub(super) const META_SET: &str = "INSERT INTO meta (key, value) VALUES ($1, $2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value";

/// The `meta` key of the audit log's head (`SEQ:HASH`).
pub(super) const AUDIT_HEAD: &str = "audit_head";

impl MetaStore for SqlTx<'_> {
    fn master_key_id(&mut self) -> Result<Option<String>> {
        self.meta_get("master_key_id")
    }

    fn set_master_key_id(&mut self, id: &str) -> Result<()> {
        self.meta_set("master_key_id", id)
    }

    fn admin_by_cert(&mut self, cert_sha256: &str) -> Result<Option<String>> {
        self.db.query_opt(
            "SELECT name FROM admins WHERE cert_sha256 = $1",
            [cert_sha256],
            |r| r.get(0),
        )
    }

    fn insert_admin(&mut self, cert_sha256: &str, name: &str, created: i64) -> Result<()> {
        self.db.execute(
            "INSERT INTO admins (cert_sha256, name, created) VALUES ($1, $2, $3)",
            params![cert_sha256, name, created],
        )?;
        Ok(())
    }

    fn admins(&mut self) -> Result<Vec<(String, String, i64)>> {
        self.db.query_all(
            "SELECT name, cert_sha256, created FROM admins ORDER BY name, created",
            (),
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
    }

    fn delete_admin(&mut self, name: &str) -> Result<usize> {
        self.db
            .execute("DELETE FROM admins WHERE name = $1", [name])
    }

    fn replace_admins(&mut self, cert_sha256: &str, name: &str, created: i64) -> Result<usize> {
        let removed = self
            .db
            .execute("DELETE FROM admins WHERE cert_sha256 <> $1", [cert_sha256])?;
        self.db
            .execute(
                "INSERT INTO admins (cert_sha256, name, created) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            params![cert_sha256, name, created])?;
        Ok(removed)
    }
}

impl AuditStore for SqlTx<'_> {
    fn audit_head(&mut self) -> Result<Option<(u64, String)>> {
        Ok(self.meta_get(AUDIT_HEAD)?.and_then(|h| {
            let (seq, hash) = h.split_once(':')?;
            Some((seq.parse().ok()?, hash.to_owned()))
        }))
    }

    fn append_audit(&mut self, r: &AuditRecord) -> Result<()> {
        // With the next statement or the commit (which fails with it).
        self.db.execute_later(
            "INSERT INTO audit (seq, time_ms, actor, action, subject, detail, prev_hash, hash, mac)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            params![
                signed(r.seq),
                r.time_ms,
                r.actor,
                r.action,
                r.subject,
                r.detail,
                r.prev_hash,
                r.hash,
                r.mac
            ],
        )?;
        self.meta_set(AUDIT_HEAD, &format!("{}:{}", r.seq, r.hash))
    }

    fn list_audit(&mut self, after_seq: u64, limit: u32) -> Result<Vec<AuditRecord>> {
        let stmt =
            &format!("SELECT {AUDIT_COLUMNS} FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2");
        let rows = self
            .db
            .query_all(stmt, params![signed(after_seq), limit], audit_row)?;
        Ok(rows)
    }

    fn audit_of(&mut self, subject: &str, limit: u32) -> Result<Vec<AuditRecord>> {
        let stmt = &format!(
            "SELECT {AUDIT_COLUMNS} FROM audit WHERE subject = $1 ORDER BY seq DESC LIMIT $2"
        );
        let mut rows = self
            .db
            .query_all(stmt, params![subject, limit], audit_row)?;
        rows.reverse();
        Ok(rows)
    }

    fn audit_record(&mut self, seq: u64) -> Result<Option<AuditRecord>> {
        self.db.query_opt(
            &format!("SELECT {AUDIT_COLUMNS} FROM audit WHERE seq = $1"),
            [signed(seq)],
            audit_row,
        )
    }

    fn audit_key(&mut self) -> Result<Option<WrappedKey>> {
        self.db.query_opt(
            "SELECT master_key_id, wrapped FROM audit_keys WHERE id = 1",
            (),
            |r| {
                Ok(WrappedKey {
                    master_key_id: r.get(0)?,
                    wrapped: r.get(1)?,
                })
            },
        )
    }

    fn put_audit_key(&mut self, key: &WrappedKey, created: i64) -> Result<()> {
        self.db.execute(
            "INSERT INTO audit_keys (id, master_key_id, wrapped, created) VALUES (1, $1, $2, $3)
                 ON CONFLICT (id) DO UPDATE SET master_key_id = excluded.master_key_id,
                     wrapped = excluded.wrapped",
            params![key.master_key_id, key.wrapped, created],
        )?;
        Ok(())
    }
}
