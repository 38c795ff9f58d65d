//! `leader_lease` and `replicas`.

use super::schema::Engine;
use super::{SqlTx, signed, unsigned};
use crate::store::{Lease, LeaseStore, Replica, Result};

impl LeaseStore for SqlTx<'_> {
    fn db_now_ms(&mut self) -> Result<i64> {
        let sql = match self.db.0.engine() {
            Engine::Sqlite => "SELECT CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)",
            Engine::Postgres => {
                "SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)"
            }
        };
        self.db.query_one(sql, (), |r| r.get(0))
    }

    fn lease(&mut self) -> Result<Option<Lease>> {
        self.db.query_opt(
            "SELECT holder, fence, since_ms, expires_ms FROM leader_lease WHERE id = 1",
            (),
            |r| {
                Ok(Lease {
                    holder: r.get(0)?,
                    fence: unsigned(r, 1)?,
                    since_ms: r.get(2)?,
                    expires_ms: r.get(3)?,
                })
            },
        )
    }

    fn put_lease(&mut self, l: &Lease) -> Result<()> {
        self.db.execute(
            "INSERT INTO leader_lease (id, holder, fence, since_ms, expires_ms)
             VALUES (1, $1, $2, $3, $4)
             ON CONFLICT (id) DO UPDATE SET holder = excluded.holder, fence = excluded.fence,
                 since_ms = excluded.since_ms, expires_ms = excluded.expires_ms",
            params![l.holder, signed(l.fence), l.since_ms, l.expires_ms],
        )?;
        Ok(())
    }

    fn holds_lease(&mut self, holder: &str, fence: u64) -> Result<bool> {
        let now = self.db_now_ms()?;
        self.db.exists(
            "SELECT 1 FROM leader_lease
             WHERE id = 1 AND holder = $1 AND fence = $2 AND expires_ms > $3",
            params![holder, signed(fence), now],
        )
    }

    fn put_replica(&mut self, r: &Replica) -> Result<()> {
        self.db.execute(
            "INSERT INTO replicas (id, address, url, host, pid, version, started_ms, seen_ms)
             VALUES ($1, $2, $8, $3, $4, $5, $6, $7)
             ON CONFLICT (id) DO UPDATE SET address = excluded.address, url = excluded.url,
                                            seen_ms = excluded.seen_ms",
            params![
                r.id,
                r.address,
                r.host,
                r.pid,
                r.version,
                r.started_ms,
                r.seen_ms,
                r.url
            ],
        )?;
        Ok(())
    }

    fn remove_replica(&mut self, id: &str) -> Result<()> {
        self.db
            .execute("DELETE FROM replicas WHERE id = $1", [id])?;
        Ok(())
    }

    fn prune_replicas(&mut self, before_ms: i64) -> Result<usize> {
        self.db
            .execute("DELETE FROM replicas WHERE seen_ms < $1", [before_ms])
    }

    fn replicas(&mut self) -> Result<Vec<Replica>> {
        self.db.query_all(
            "SELECT id, address, host, pid, version, started_ms, seen_ms, url FROM replicas
             ORDER BY started_ms, id",
            (),
            |r| {
                Ok(Replica {
                    id: r.get(0)?,
                    address: r.get(1)?,
                    host: r.get(2)?,
                    pid: r.get(3)?,
                    version: r.get(4)?,
                    started_ms: r.get(5)?,
                    seen_ms: r.get(6)?,
                    url: r.get(7)?,
                })
            },
        )
    }
}
