//! `guests`, `guest_disks` and `guest_migrations`.

use super::volumes::{VOLUME_COLUMNS, volume_row};
use super::{Params, Row, SqlTx, typed, unsigned};
use crate::model::{GuestInfo, GuestOp, GuestState, VolumeInfo};
use crate::store::{
    GuestKey, GuestStore, MigrationRecord, MigrationStore, NewGuest, Result, WrappedKey,
};

const GUEST_SELECT: &str =
    "SELECT g.uuid, g.name, g.host, g.state, g.pending, g.last_error, g.attempts, g.xml,
    COALESCE((SELECT string_agg(v.name, ',') FROM guest_disks d JOIN volumes v ON v.id = d.volume_id
              WHERE d.guest_uuid = g.uuid), ''),
    COALESCE((SELECT m.to_host FROM guest_migrations m WHERE m.guest_uuid = g.uuid), ''),
    g.failures
    FROM guests g";

fn guest_row(r: &Row) -> Result<GuestInfo> {
    let pending: String = r.get(4)?;
    let vols: String = r.get(8)?;
    let migrating_to: String = r.get(9)?;
    Ok(GuestInfo {
        uuid: r.get(0)?,
        name: r.get(1)?,
        host: r.get(2)?,
        state: typed(r, 3, "guests.state")?,
        pending: if pending.is_empty() {
            None
        } else {
            Some(typed::<GuestOp>(r, 4, "guests.pending")?)
        },
        last_error: r.get(5)?,
        attempts: r.get(6)?,
        failures: r.get(10)?,
        domain_xml: r.get(7)?,
        migrating_to: (!migrating_to.is_empty()).then_some(migrating_to),
        volumes: vols
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

impl SqlTx<'_> {
    fn guests_where(&mut self, sql_where: &str, p: impl Params) -> Result<Vec<GuestInfo>> {
        self.db
            .query_all(&format!("{GUEST_SELECT} {sql_where}"), p, guest_row)
    }

    fn run(&mut self, sql: &str, p: impl Params) -> Result<()> {
        self.db.execute(sql, p)?;
        Ok(())
    }
}

impl GuestStore for SqlTx<'_> {
    fn guests(&mut self, host: Option<&str>) -> Result<Vec<GuestInfo>> {
        self.guests_where(
            "WHERE g.state != 'undefined' AND (CAST($1 AS TEXT) IS NULL OR g.host = $1) ORDER BY g.host, g.name",
            [host],
        )
    }

    fn guest(&mut self, uuid: &str) -> Result<Option<GuestInfo>> {
        self.db.query_opt(
            &format!("{GUEST_SELECT} WHERE g.uuid = $1"),
            [uuid],
            guest_row,
        )
    }

    fn live_guests_named(&mut self, name: &str) -> Result<Vec<GuestInfo>> {
        self.guests_where("WHERE g.name = $1 AND g.state != 'undefined'", [name])
    }

    fn live_guest_conflicts(&mut self, uuid: &str, host: &str, name: &str) -> Result<bool> {
        let n: i64 = self
            .db
            .query_one(
                "SELECT COUNT(*) FROM guests
                 WHERE (uuid = $1 OR (host = $2 AND name = $3)) AND state NOT IN ('undefined', 'failed')",
            params![uuid, host, name], |r| r.get(0))?;
        Ok(n > 0)
    }

    fn forget_gone_guests(&mut self, uuid: &str, host: &str, name: &str) -> Result<()> {
        const GONE: &str =
            "(uuid = $1 OR (host = $2 AND name = $3)) AND state IN ('undefined', 'failed')";
        self.run(
            &format!(
                "DELETE FROM guest_disks WHERE guest_uuid IN (SELECT uuid FROM guests WHERE {GONE})"
            ),
            params![uuid, host, name],
        )?;
        self.run(
            &format!("DELETE FROM guests WHERE {GONE}"),
            params![uuid, host, name],
        )
    }

    fn insert_guest(&mut self, g: &NewGuest) -> Result<()> {
        self.run(
            "INSERT INTO guests (uuid, name, host, xml, state, pending, created)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            params![
                g.uuid,
                g.name,
                g.host,
                g.xml,
                GuestState::PendingDefine.as_str(),
                GuestOp::Define.as_str(),
                g.created
            ],
        )
    }

    fn insert_guest_disk(&mut self, uuid: &str, volume_id: &str, target: &str) -> Result<()> {
        self.run(
            "INSERT INTO guest_disks (guest_uuid, volume_id, target) VALUES ($1, $2, $3)",
            params![uuid, volume_id, target],
        )
    }

    fn add_guest_disk(&mut self, uuid: &str, volume_id: &str, target: &str) -> Result<()> {
        self.run(
            "INSERT INTO guest_disks (guest_uuid, volume_id, target) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            params![uuid, volume_id, target],
        )
    }

    fn queue_guest_op(&mut self, uuid: &str, op: GuestOp) -> Result<()> {
        self.run(
            "UPDATE guests SET pending = $1, attempts = 0, failures = 0, next_attempt = 0, last_error = ''
             WHERE uuid = $2",
            params![op.as_str(), uuid],
        )
    }

    fn redefine_guest(&mut self, uuid: &str, xml: &str) -> Result<()> {
        self.run(
            "UPDATE guests SET xml = $1, pending = 'define', attempts = 0, failures = 0, next_attempt = 0,
                 last_error = '' WHERE uuid = $2",
            params![xml, uuid],
        )
    }

    fn due_guests(&mut self, now_ms: i64, limit: u32) -> Result<Vec<GuestInfo>> {
        self.guests_where(
            "WHERE g.pending != '' AND g.next_attempt <= $1 ORDER BY g.next_attempt LIMIT $2",
            params![now_ms, limit],
        )
    }

    fn guest_keys(&mut self, uuid: &str, host: &str) -> Result<Vec<GuestKey>> {
        let stmt =
            "SELECT v.id, v.generation, v.format, k.master_key_id, k.wrapped, v.release_policy
             FROM guest_disks d JOIN volumes v ON v.id = d.volume_id
             JOIN volume_keys k ON k.volume_id = v.id AND k.generation = v.generation
             WHERE d.guest_uuid = $1 AND v.host = $2";
        let rows = self.db.query_all(stmt, params![uuid, host], |r| {
            Ok(GuestKey {
                volume_id: r.get(0)?,
                generation: unsigned(r, 1)?,
                format: typed(r, 2, "volumes.format")?,
                key: WrappedKey {
                    master_key_id: r.get(3)?,
                    wrapped: r.get(4)?,
                },
                release: typed(r, 5, "volumes.release_policy")?,
            })
        })?;
        Ok(rows)
    }

    fn guest_volumes(&mut self, uuid: &str) -> Result<Vec<VolumeInfo>> {
        let stmt = &format!(
            "SELECT {VOLUME_COLUMNS} FROM guest_disks d JOIN volumes v ON v.id = d.volume_id
             WHERE d.guest_uuid = $1 ORDER BY v.name"
        );
        let rows = self.db.query_all(stmt, [uuid], volume_row)?;
        Ok(rows)
    }

    fn guest_op_done(&mut self, uuid: &str, op: GuestOp, state: GuestState) -> Result<()> {
        self.run(
            "UPDATE guests SET state = $1, pending = '', last_error = '', attempts = 0
             WHERE uuid = $2 AND pending = $3",
            params![state.as_str(), uuid, op.as_str()],
        )
    }

    fn guest_attempt_failed(
        &mut self,
        uuid: &str,
        error: &str,
        next_attempt_ms: i64,
        counts: bool,
    ) -> Result<()> {
        self.run(
            "UPDATE guests SET attempts = attempts + 1, failures = failures + $1, last_error = $2,
                 next_attempt = $3 WHERE uuid = $4",
            params![i64::from(counts), error, next_attempt_ms, uuid],
        )
    }

    fn settle_guest(&mut self, uuid: &str, state: Option<GuestState>, error: &str) -> Result<()> {
        self.run(
            "UPDATE guests SET pending = '', last_error = $1, state = COALESCE($2, state) WHERE uuid = $3",
            params![error, state.map(GuestState::as_str), uuid],
        )
    }

    fn guests_to_adopt(&mut self, host: &str) -> Result<Vec<(String, String)>> {
        let stmt = "SELECT uuid, xml FROM guests
             WHERE host = $1 AND state != 'undefined' AND pending IN ('', 'define')";
        let rows = self
            .db
            .query_all(stmt, [host], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows)
    }

    fn move_guest(&mut self, uuid: &str, host: &str, state: GuestState) -> Result<()> {
        self.run(
            "UPDATE guests SET host = $1, state = $2, last_error = '' WHERE uuid = $3",
            params![host, state.as_str(), uuid],
        )
    }

    fn set_guest_error(&mut self, uuid: &str, error: &str) -> Result<()> {
        self.run(
            "UPDATE guests SET last_error = $1 WHERE uuid = $2",
            params![error, uuid],
        )
    }
}

impl MigrationStore for SqlTx<'_> {
    fn insert_migration(&mut self, m: &MigrationRecord) -> Result<()> {
        self.run(
            "INSERT INTO guest_migrations (guest_uuid, from_host, to_host, started, live, unsafe, driver)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            params![
                m.guest_uuid,
                m.from_host,
                m.to_host,
                m.started,
                m.live,
                m.unsafe_,
                m.driver
            ],
        )
    }

    fn migration(&mut self, guest_uuid: &str) -> Result<Option<MigrationRecord>> {
        self.db.query_opt(
            "SELECT guest_uuid, from_host, to_host, started, live, unsafe, driver
                 FROM guest_migrations WHERE guest_uuid = $1",
            [guest_uuid],
            migration_row,
        )
    }

    fn migrations(&mut self) -> Result<Vec<MigrationRecord>> {
        let stmt = "SELECT guest_uuid, from_host, to_host, started, live, unsafe, driver FROM guest_migrations";
        let rows = self.db.query_all(stmt, (), migration_row)?;
        Ok(rows)
    }

    fn set_migration_driver(&mut self, guest_uuid: &str, driver: &str) -> Result<()> {
        self.run(
            "UPDATE guest_migrations SET driver = $2 WHERE guest_uuid = $1",
            params![guest_uuid, driver],
        )
    }

    fn delete_migration(&mut self, guest_uuid: &str) -> Result<()> {
        self.run(
            "DELETE FROM guest_migrations WHERE guest_uuid = $1",
            [guest_uuid],
        )
    }
}

fn migration_row(r: &Row) -> Result<MigrationRecord> {
    Ok(MigrationRecord {
        guest_uuid: r.get(0)?,
        from_host: r.get(1)?,
        to_host: r.get(2)?,
        started: r.get(3)?,
        live: r.get(4)?,
        unsafe_: r.get(5)?,
        driver: r.get(6)?,
    })
}
