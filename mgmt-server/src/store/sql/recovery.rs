//! `recovery`: the one row of the server's recovery record.

use super::{SqlTx, unsigned};
use crate::store::{RecoveryRecord, RecoveryStore, Result};

impl RecoveryStore for SqlTx<'_> {
    fn recovery(&mut self) -> Result<Option<RecoveryRecord>> {
        self.db.query_opt(
            "SELECT split_id, threshold, shares, created, recipient, custodians,
                 master_key_id, sealed_master, bundle, bundle_sha256
             FROM recovery WHERE id = 1",
            (),
            |r| {
                let custodians: String = r.get(5)?;
                Ok(RecoveryRecord {
                    split_id: r.get(0)?,
                    threshold: u8::try_from(unsigned(r, 1)?).unwrap_or(0),
                    shares: u8::try_from(unsigned(r, 2)?).unwrap_or(0),
                    created: r.get(3)?,
                    recipient: r.get(4)?,
                    custodians: custodians
                        .split('\n')
                        .filter(|x| !x.is_empty())
                        .map(str::to_owned)
                        .collect(),
                    master_key_id: r.get(6)?,
                    sealed_master: r.get(7)?,
                    bundle: r.get(8)?,
                    bundle_sha256: r.get(9)?,
                })
            },
        )
    }

    fn put_recovery(&mut self, r: &RecoveryRecord) -> Result<()> {
        self.db.execute(
            "INSERT INTO recovery (id, split_id, threshold, shares, created, recipient,
                 custodians, master_key_id, sealed_master, bundle, bundle_sha256)
             VALUES (1, $1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (id) DO UPDATE SET split_id = excluded.split_id,
                 threshold = excluded.threshold, shares = excluded.shares,
                 created = excluded.created, recipient = excluded.recipient,
                 custodians = excluded.custodians, master_key_id = excluded.master_key_id,
                 sealed_master = excluded.sealed_master, bundle = excluded.bundle,
                 bundle_sha256 = excluded.bundle_sha256",
            params![
                r.split_id,
                i64::from(r.threshold),
                i64::from(r.shares),
                r.created,
                r.recipient,
                r.custodians.join("\n"),
                r.master_key_id,
                r.sealed_master,
                r.bundle,
                r.bundle_sha256
            ],
        )?;
        Ok(())
    }
}
