//! `escrow_packets`: requests for escrow packets, their decisions and the
//! packets' ciphertext. Whether a made packet is obsolete is read against
//! its volume's row in the same query.

use super::{Row, SqlTx, signed, typed, unsigned};
use crate::model::{EscrowEntry, EscrowState};
use crate::store::{EscrowStore, Result};

/// The columns [`row`] reads, `e` the request and `v` its volume.
const COLUMNS: &str = "e.id, e.volume_id, e.volume_name, e.host, e.generation, e.recipients,
    e.reason, e.requested_by, e.requested_unix, e.state, e.decided_by, e.decided_unix, e.note,
    e.luks_uuid, LENGTH(e.packet),
    CASE WHEN e.state = 'made' AND (v.id IS NULL OR v.state IN ('deleted', 'decrypted')
        OR v.generation <> e.generation) THEN 1 ELSE 0 END";

/// The requests with their volumes.
const FROM: &str = "FROM escrow_packets e LEFT JOIN volumes v ON v.id = e.volume_id";

/// Pending, or made and not obsolete.
const OPEN: &str = "(e.state = 'pending' OR (e.state = 'made' AND v.generation = e.generation
    AND v.state NOT IN ('deleted', 'decrypted')))";

fn row(r: &Row) -> Result<EscrowEntry> {
    let recipients: String = r.get(5)?;
    Ok(EscrowEntry {
        id: r.get(0)?,
        volume_id: r.get(1)?,
        volume_name: r.get(2)?,
        host: r.get(3)?,
        generation: unsigned(r, 4)?,
        recipients: recipients
            .split('\n')
            .filter(|x| !x.is_empty())
            .map(str::to_owned)
            .collect(),
        reason: r.get(6)?,
        requested_by: r.get(7)?,
        requested_unix: r.get(8)?,
        state: typed(r, 9, "escrow_packets.state")?,
        decided_by: r.get(10)?,
        decided_unix: r.get(11)?,
        note: r.get(12)?,
        luks_uuid: r.get(13)?,
        packet_bytes: unsigned(r, 14)?,
        obsolete: r.get(15)?,
    })
}

impl EscrowStore for SqlTx<'_> {
    fn insert_escrow(&mut self, e: &EscrowEntry) -> Result<()> {
        self.db.execute(
            "INSERT INTO escrow_packets (id, n, volume_id, volume_name, host, generation,
                 recipients, reason, requested_by, requested_unix, state, decided_by,
                 decided_unix, note, luks_uuid, packet)
             VALUES ($1, (SELECT COALESCE(MAX(n), 0) + 1 FROM escrow_packets), $2, $3, $4, $5,
                 $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
            params![
                e.id,
                e.volume_id,
                e.volume_name,
                e.host,
                signed(e.generation),
                e.recipients.join("\n"),
                e.reason,
                e.requested_by,
                e.requested_unix,
                e.state.as_str(),
                e.decided_by,
                e.decided_unix,
                e.note,
                e.luks_uuid,
                Vec::<u8>::new()
            ],
        )?;
        Ok(())
    }

    fn escrow(&mut self, id: &str) -> Result<Option<EscrowEntry>> {
        self.db.query_opt(
            &format!("SELECT {COLUMNS} {FROM} WHERE e.id = $1"),
            [id],
            row,
        )
    }

    fn escrow_entries(
        &mut self,
        volume_id: Option<&str>,
        open_only: bool,
    ) -> Result<Vec<EscrowEntry>> {
        // One statement per case, each answered from an index (see
        // domain/tests/plans.rs); only the listing of every request of
        // every volume reads the whole table, newest first.
        let (filter, p): (String, Vec<&str>) = match (volume_id, open_only) {
            (Some(v), true) => (format!(" WHERE e.volume_id = $1 AND {OPEN}"), vec![v]),
            (Some(v), false) => (" WHERE e.volume_id = $1".into(), vec![v]),
            (None, true) => (
                format!(" WHERE e.state IN ('pending', 'made') AND {OPEN}"),
                vec![],
            ),
            (None, false) => (String::new(), vec![]),
        };
        let stmt = format!("SELECT {COLUMNS} {FROM}{filter} ORDER BY e.n DESC LIMIT 1000");
        match p.as_slice() {
            [v] => self.db.query_all(&stmt, [*v], row),
            _ => self.db.query_all(&stmt, (), row),
        }
    }

    fn escrow_open_count(&mut self, volume_id: &str, generation: u64) -> Result<u32> {
        self.db.query_one(
            "SELECT COUNT(*) FROM escrow_packets WHERE volume_id = $1
                 AND (state = 'pending' OR (state = 'made' AND generation = $2))",
            params![volume_id, signed(generation)],
            |r| r.get(0),
        )
    }

    fn escrow_pending_count(&mut self, requested_by: &str) -> Result<u32> {
        self.db.query_one(
            "SELECT COUNT(*) FROM escrow_packets WHERE requested_by = $1 AND state = 'pending'",
            [requested_by],
            |r| r.get(0),
        )
    }

    fn decide_escrow(
        &mut self,
        id: &str,
        to: EscrowState,
        now: i64,
        by: &str,
        note: &str,
        made: Option<(&str, &[u8])>,
    ) -> Result<bool> {
        let n = match made {
            Some((luks_uuid, packet)) => self.db.execute(
                "UPDATE escrow_packets SET state = $2, decided_unix = $3, decided_by = $4,
                     note = $5, luks_uuid = $6, packet = $7
                 WHERE id = $1 AND state = 'pending'",
                params![id, to.as_str(), now, by, note, luks_uuid, packet],
            )?,
            None => self.db.execute(
                "UPDATE escrow_packets SET state = $2, decided_unix = $3, decided_by = $4,
                     note = $5
                 WHERE id = $1 AND state = 'pending'",
                params![id, to.as_str(), now, by, note],
            )?,
        };
        Ok(n == 1)
    }

    fn escrow_packet(&mut self, id: &str) -> Result<Option<Vec<u8>>> {
        self.db.query_opt(
            "SELECT packet FROM escrow_packets WHERE id = $1",
            [id],
            |r| r.get(0),
        )
    }

    fn expire_escrow(&mut self, before: i64) -> Result<Vec<String>> {
        let ids: Vec<String> = self.db.query_all(
            "SELECT id FROM escrow_packets WHERE state = 'pending' AND requested_unix < $1
             ORDER BY n",
            [before],
            |r| r.get(0),
        )?;
        if !ids.is_empty() {
            self.db.execute(
                "UPDATE escrow_packets SET state = 'expired'
                 WHERE state = 'pending' AND requested_unix < $1",
                [before],
            )?;
        }
        Ok(ids)
    }
}
