//! `volumes` and `volume_keys`.

use super::{Params, Row, SqlTx, signed, typed, unsigned};
use crate::model::{
    RekeyKind, RekeyOrder, RekeyPlacement, ReleasePolicy, VolumeInfo, VolumeOp, VolumeState,
};
use crate::store::{NewVolume, Result, VolumeStore, WrappedKey};

pub(super) const VOLUME_COLUMNS: &str = "v.id, v.name, v.host, v.pool, v.format, v.capacity,
    v.generation, v.state, v.last_error, v.attempts, v.secret_uuid, v.created, v.rekey_due,
    v.path, v.rekey_kind, v.rekey_placement, v.rekey_bandwidth, v.failures, v.failed_op,
    v.release_policy, v.split";

pub(super) fn volume_row(r: &Row) -> Result<VolumeInfo> {
    let state: VolumeState = typed(r, 7, "volumes.state")?;
    let failed_op = if state == VolumeState::Failed {
        Some(typed::<VolumeOp>(r, 18, "volumes.failed_op")?)
    } else {
        None
    };
    let rekey = if state == VolumeState::Rekeying || failed_op == Some(VolumeOp::Rekey) {
        // A rekey recorded without its kind was shallow.
        let kind: String = r.get(14)?;
        Some(RekeyOrder {
            kind: if kind.is_empty() {
                RekeyKind::Shallow
            } else {
                typed(r, 14, "volumes.rekey_kind")?
            },
            placement: typed::<RekeyPlacement>(r, 15, "volumes.rekey_placement")?,
            bandwidth: unsigned(r, 16)?,
        })
    } else {
        None
    };
    Ok(VolumeInfo {
        id: r.get(0)?,
        name: r.get(1)?,
        host: r.get(2)?,
        pool: r.get(3)?,
        format: typed(r, 4, "volumes.format")?,
        capacity_bytes: unsigned(r, 5)?,
        key_generation: unsigned(r, 6)?,
        state,
        last_error: r.get(8)?,
        attempts: r.get(9)?,
        failures: r.get(17)?,
        failed_op,
        secret_uuid: r.get(10)?,
        created_unix: r.get(11)?,
        rekey_due_unix: r.get(12)?,
        path: r.get(13)?,
        rekey,
        progress: None,
        release: typed(r, 19, "volumes.release_policy")?,
        split: r.get(20)?,
    })
}

/// By UUID, or by name (not deleted), the live one first.
pub(crate) const FIND: &str = "WHERE v.id = $1 OR (v.name = $1 AND v.state != 'deleted')
    ORDER BY v.state IN ('deleted', 'decrypted') LIMIT 1";
/// By name, not deleted.
pub(crate) const NAMED: &str = "WHERE v.name = $1 AND v.state != 'deleted' LIMIT 1";
/// By the path the host reported, not deleted.
pub(crate) const AT_PATH: &str =
    "WHERE v.path = $1 AND v.path != '' AND v.state != 'deleted' LIMIT 1";

impl SqlTx<'_> {
    fn volumes_where(&mut self, sql_where: &str, p: impl Params) -> Result<Vec<VolumeInfo>> {
        let stmt = &format!("SELECT {VOLUME_COLUMNS} FROM volumes v {sql_where}");
        let rows = self.db.query_all(stmt, p, volume_row)?;
        Ok(rows)
    }

    fn volume_where(&mut self, sql_where: &str, p: impl Params) -> Result<Option<VolumeInfo>> {
        self.db.query_opt(
            &format!("SELECT {VOLUME_COLUMNS} FROM volumes v {sql_where}"),
            p,
            volume_row,
        )
    }

    /// A write whose row count is not needed: on PostgreSQL sent with the
    /// transaction's next statement or commit.
    pub(super) fn exec(&mut self, sql: &str, p: impl Params) -> Result<()> {
        self.db.execute_later(sql, p)
    }
}

impl VolumeStore for SqlTx<'_> {
    fn volume_name_taken(&mut self, name: &str) -> Result<bool> {
        let n: i64 = self
            .db
            .query_one(
                "SELECT COUNT(*) FROM volumes WHERE name = $1 AND state NOT IN ('deleted', 'decrypted')",
            [name], |r| r.get(0))?;
        Ok(n > 0)
    }

    fn host_volume_count(&mut self, host: &str) -> Result<u32> {
        self.db.query_one(
            "SELECT COUNT(*) FROM volumes WHERE host = $1 AND state != 'deleted'",
            [host],
            |r| r.get(0),
        )
    }

    fn volume_state_counts(&mut self) -> Result<Vec<(String, u64)>> {
        self.db.query_all(
            "SELECT state, COUNT(*) FROM volumes GROUP BY state",
            (),
            |r| Ok((r.get(0)?, unsigned(r, 1)?)),
        )
    }

    fn insert_volume(&mut self, v: &NewVolume) -> Result<()> {
        self.exec(
            "INSERT INTO volumes (id, name, host, pool, format, capacity, secret_uuid, generation, state, created, release_policy, split)
             VALUES ($1, $2, $3, $4, $5, $6, $7, 1, $8, $9, $10, $11)",
            params![
                v.id,
                v.name,
                v.host,
                v.pool,
                v.format.as_str(),
                signed(v.capacity),
                v.secret_uuid,
                v.state.as_str(),
                v.created,
                v.release.as_str(),
                v.split
            ],
        )
    }

    fn release_material(
        &mut self,
        id: &str,
        generation: u64,
    ) -> Result<Option<(ReleasePolicy, bool, Option<WrappedKey>)>> {
        type Found = (String, bool, Option<String>, Option<Vec<u8>>);
        let row: Option<Found> = self.db.query_opt(
            "SELECT v.release_policy, v.split, k.master_key_id, k.wrapped FROM volumes v
             LEFT JOIN volume_keys k ON k.volume_id = v.id AND k.generation = $2
             WHERE v.id = $1",
            params![id, signed(generation)],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )?;
        let Some((t, split, master_key_id, wrapped)) = row else {
            return Ok(None);
        };
        let policy = t.parse().map_err(|_| {
            crate::model::StoreError::Corrupt(format!("volumes.release_policy {t:?}"))
        })?;
        let key = match (master_key_id, wrapped) {
            (Some(master_key_id), Some(wrapped)) => Some(WrappedKey {
                master_key_id,
                wrapped,
            }),
            _ => None,
        };
        Ok(Some((policy, split, key)))
    }

    fn set_release_policy(&mut self, id: &str, release: ReleasePolicy) -> Result<()> {
        self.exec(
            "UPDATE volumes SET release_policy = $2 WHERE id = $1",
            params![id, release.as_str()],
        )
    }

    fn volumes(&mut self, host: Option<&str>) -> Result<Vec<VolumeInfo>> {
        self.volumes_where(
            "WHERE v.state != 'deleted' AND (CAST($1 AS TEXT) IS NULL OR v.host = $1) ORDER BY v.name",
            [host],
        )
    }

    fn volume_is(
        &mut self,
        id: &str,
        state: VolumeState,
        generation: u64,
        host: &str,
    ) -> Result<bool> {
        self.db.exists(
            "SELECT 1 FROM volumes WHERE id = $1 AND state = $2 AND generation = $3 AND host = $4",
            params![id, state.as_str(), signed(generation), host],
        )
    }

    fn volume(&mut self, id: &str) -> Result<Option<VolumeInfo>> {
        self.volume_where("WHERE v.id = $1", [id])
    }

    fn find_volume(&mut self, name_or_id: &str) -> Result<Option<VolumeInfo>> {
        self.volume_where(FIND, [name_or_id])
    }

    fn volume_named(&mut self, name: &str) -> Result<Option<VolumeInfo>> {
        self.volume_where(NAMED, [name])
    }

    fn volume_at_path(&mut self, path: &str) -> Result<Option<VolumeInfo>> {
        self.volume_where(AT_PATH, [path])
    }

    fn due_volumes(&mut self, now_ms: i64, limit: u32) -> Result<Vec<VolumeInfo>> {
        self.volumes_where(
            "WHERE v.state IN ('pending-create', 'pending-encrypt', 'pending-decrypt', 'pending-delete', 'rekeying')
               AND v.next_attempt <= $1
             ORDER BY v.next_attempt LIMIT $2",
            params![now_ms, limit],
        )
    }

    fn volume_users(&mut self, id: &str) -> Result<Vec<String>> {
        let stmt = "SELECT g.name FROM guest_disks d JOIN guests g ON g.uuid = d.guest_uuid
             WHERE d.volume_id = $1 AND g.state != 'undefined' ORDER BY g.name";
        let rows = self.db.query_all(stmt, [id], |r| r.get(0))?;
        Ok(rows)
    }

    fn insert_volume_key(
        &mut self,
        id: &str,
        generation: u64,
        key: &WrappedKey,
        created: i64,
    ) -> Result<()> {
        self.exec(
            "INSERT INTO volume_keys (volume_id, generation, master_key_id, wrapped, created)
             VALUES ($1, $2, $3, $4, $5)",
            params![
                id,
                signed(generation),
                key.master_key_id,
                key.wrapped,
                created
            ],
        )
    }

    fn volume_key(&mut self, id: &str, generation: u64) -> Result<Option<WrappedKey>> {
        self
            .db
            .query_opt(
                "SELECT master_key_id, wrapped FROM volume_keys WHERE volume_id = $1 AND generation = $2",
            params![id, signed(generation)], |r| {
                Ok(WrappedKey {
                    master_key_id: r.get(0)?,
                    wrapped: r.get(1)?,
                })
            })
    }

    fn all_volume_keys(&mut self) -> Result<Vec<(String, u64, WrappedKey)>> {
        let stmt = "SELECT volume_id, generation, master_key_id, wrapped FROM volume_keys";
        let rows = self.db.query_all(stmt, (), |r| {
            Ok((
                r.get(0)?,
                unsigned(r, 1)?,
                WrappedKey {
                    master_key_id: r.get(2)?,
                    wrapped: r.get(3)?,
                },
            ))
        })?;
        Ok(rows)
    }

    fn rewrap_volume_key(&mut self, id: &str, generation: u64, key: &WrappedKey) -> Result<()> {
        self.exec(
            "UPDATE volume_keys SET master_key_id = $1, wrapped = $2 WHERE volume_id = $3 AND generation = $4",
            params![key.master_key_id, key.wrapped, id, signed(generation)],
        )
    }

    fn delete_volume_key(&mut self, id: &str, generation: u64) -> Result<()> {
        self.exec(
            "DELETE FROM volume_keys WHERE volume_id = $1 AND generation = $2",
            params![id, signed(generation)],
        )
    }

    fn delete_volume_keys(&mut self, id: &str) -> Result<()> {
        self.exec("DELETE FROM volume_keys WHERE volume_id = $1", [id])
    }

    fn set_volume_state(&mut self, id: &str, state: VolumeState) -> Result<()> {
        self.exec(
            "UPDATE volumes SET state = $1 WHERE id = $2",
            params![state.as_str(), id],
        )
    }

    fn set_volume_state_error(&mut self, id: &str, state: VolumeState, error: &str) -> Result<()> {
        self.exec(
            "UPDATE volumes SET state = $1, last_error = $2 WHERE id = $3",
            params![state.as_str(), error, id],
        )
    }

    fn queue_volume_op(&mut self, id: &str, state: VolumeState) -> Result<()> {
        self.exec(
            "UPDATE volumes SET state = $1, attempts = 0, failures = 0, next_attempt = 0, last_error = '',
                 failed_op = '' WHERE id = $2",
            params![state.as_str(), id],
        )
    }

    fn queue_rekey(&mut self, id: &str, order: &RekeyOrder) -> Result<()> {
        self.exec(
            "UPDATE volumes SET state = 'rekeying', rekey_kind = $1, rekey_placement = $2,
                 rekey_bandwidth = $3, attempts = 0, failures = 0, next_attempt = 0, last_error = '',
                 failed_op = '' WHERE id = $4",
            params![
                order.kind.as_str(),
                order.placement.as_str(),
                signed(order.bandwidth),
                id
            ],
        )
    }

    fn volume_attempt_failed(
        &mut self,
        id: &str,
        error: &str,
        next_attempt_ms: i64,
        counts: bool,
    ) -> Result<()> {
        self.exec(
            "UPDATE volumes SET attempts = attempts + 1, failures = failures + $1, last_error = $2,
                 next_attempt = $3 WHERE id = $4",
            params![i64::from(counts), error, next_attempt_ms, id],
        )
    }

    fn fail_volume(&mut self, id: &str, op: VolumeOp, error: &str) -> Result<()> {
        self.exec(
            "UPDATE volumes SET state = 'failed', failed_op = $1, last_error = $2 WHERE id = $3",
            params![op.as_str(), error, id],
        )
    }

    fn encrypt_later(&mut self, id: &str, error: &str, next_attempt_ms: i64) -> Result<()> {
        self.exec(
            "UPDATE volumes SET state = 'pending-encrypt', last_error = $1, attempts = 1, failures = 0,
                 next_attempt = $2 WHERE id = $3",
            params![error, next_attempt_ms, id],
        )
    }

    fn volume_made(&mut self, id: &str, path: &str, capacity: Option<u64>) -> Result<()> {
        match capacity {
            Some(c) => self.exec(
                "UPDATE volumes SET state = 'ready', last_error = '', path = $1, capacity = $2 WHERE id = $3",
                params![path, signed(c.max(1)), id],
            ),
            None => self.exec(
                "UPDATE volumes SET state = 'ready', last_error = '', path = $1 WHERE id = $2",
                params![path, id],
            ),
        }
    }

    fn volume_rekeyed(&mut self, id: &str, generation: u64, deep: bool) -> Result<()> {
        self.exec(
            "UPDATE volumes SET state = 'ready', last_error = '', generation = $1,
                 rekey_due = CASE WHEN $2 THEN 0 ELSE rekey_due END
             WHERE id = $3",
            params![signed(generation), deep, id],
        )
    }

    fn rekey_dropped(&mut self, id: &str, error: &str) -> Result<()> {
        self.exec(
            "UPDATE volumes SET state = 'ready', last_error = $1, rekey_kind = '', rekey_placement = ''
             WHERE id = $2",
            params![error, id],
        )
    }

    fn move_volume(&mut self, id: &str, host: &str, rekey_due: i64) -> Result<()> {
        self.exec(
            "UPDATE volumes SET host = $1, state = 'ready', rekey_due = $2 WHERE id = $3",
            params![host, rekey_due, id],
        )
    }
}
