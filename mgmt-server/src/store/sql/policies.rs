//! `policies` in SQLite, and the scheduler's queries over them.

use super::{Row, SqlTx, signed, typed, unsigned};
use crate::model::{ManagedPool, Overdue, Policy, PolicyScope, RekeyKind};
use crate::store::{ConsoleSession, PolicyStore, Result};

const POLICY_COLUMNS: &str =
    "scope, target, max_key_age_secs, mode, COALESCE(after_migration_secs, 0)";

/// States in which a volume's key can be overdue: it is in use and no rekey
/// or removal is under way, or a rekey was given up.
const KEYED: &str =
    "(v.state IN ('ready', 'migrating') OR (v.state = 'failed' AND v.failed_op = 'rekey'))";

fn managed_pool_row(r: &Row) -> Result<ManagedPool> {
    Ok(ManagedPool {
        host: r.get(0)?,
        pool: r.get(1)?,
        since: r.get(2)?,
        by: r.get(3)?,
    })
}

fn policy_row(r: &Row) -> Result<Policy> {
    Ok(Policy {
        scope: typed(r, 0, "policies.scope")?,
        target: r.get(1)?,
        max_key_age_secs: unsigned(r, 2)?,
        mode: typed(r, 3, "policies.mode")?,
        after_migration_secs: unsigned(r, 4)?,
    })
}

impl PolicyStore for SqlTx<'_> {
    fn upsert_policy(&mut self, p: &Policy) -> Result<()> {
        self.db
            .execute(
                "INSERT INTO policies (scope, target, max_key_age_secs, mode, after_migration_secs)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (scope, target) DO UPDATE SET max_key_age_secs = excluded.max_key_age_secs,
                     mode = excluded.mode, after_migration_secs = excluded.after_migration_secs",
            params![
                p.scope.as_str(),
                p.target,
                signed(p.max_key_age_secs),
                p.mode.as_str(),
                (p.after_migration_secs > 0).then_some(signed(p.after_migration_secs))
            ])?;
        Ok(())
    }

    fn policies(&mut self) -> Result<Vec<Policy>> {
        let stmt = &format!("SELECT {POLICY_COLUMNS} FROM policies ORDER BY scope, target");
        let rows = self.db.query_all(stmt, (), policy_row)?;
        Ok(rows)
    }

    fn delete_policy(&mut self, scope: PolicyScope, target: &str) -> Result<bool> {
        let n = self.db.execute(
            "DELETE FROM policies WHERE scope = $1 AND target = $2",
            params![scope.as_str(), target],
        )?;
        Ok(n > 0)
    }

    fn policy_for(&mut self, volume_id: &str, pool: &str) -> Result<Option<Policy>> {
        self.db.query_opt(
            &format!(
                "SELECT {POLICY_COLUMNS} FROM policies
                 WHERE (scope = 'volume' AND target = $1) OR (scope = 'pool' AND target = $2)
                 ORDER BY scope = 'volume' DESC LIMIT 1"
            ),
            params![volume_id, pool],
            policy_row,
        )
    }

    fn due_for_rotation(&mut self, now: i64) -> Result<Vec<(String, RekeyKind)>> {
        let stmt = "SELECT v.id, COALESCE(pv.mode, pp.mode)
             FROM volumes v
             JOIN volume_keys k ON k.volume_id = v.id AND k.generation = v.generation
             JOIN hosts h ON h.name = v.host AND h.state = 'enrolled'
             LEFT JOIN policies pv ON pv.scope = 'volume' AND pv.target = v.id
             LEFT JOIN policies pp ON pp.scope = 'pool' AND pp.target = v.pool
             WHERE v.state = 'ready'
               AND COALESCE(pv.max_key_age_secs, pp.max_key_age_secs) IS NOT NULL
               AND k.created + COALESCE(pv.max_key_age_secs, pp.max_key_age_secs) <= $1";
        let rows = self.db.query_all(stmt, [now], |r| {
            Ok((r.get(0)?, typed(r, 1, "policies.mode")?))
        })?;
        Ok(rows)
    }

    fn rekeys_overdue(&mut self, now: i64) -> Result<Overdue> {
        // Two look-ups, each answered from an index (policies first, then
        // the volumes of each); a volume both name counts once, from the
        // earlier of its two due times.
        let by_policy = format!(
            "SELECT v.id, k.created + COALESCE(pv.max_key_age_secs, pp.max_key_age_secs)
             FROM volumes v
             JOIN volume_keys k ON k.volume_id = v.id AND k.generation = v.generation
             LEFT JOIN policies pv ON pv.scope = 'volume' AND pv.target = v.id
             LEFT JOIN policies pp ON pp.scope = 'pool' AND pp.target = v.pool
             WHERE {KEYED}
               AND COALESCE(pv.max_key_age_secs, pp.max_key_age_secs) IS NOT NULL
               AND k.created + COALESCE(pv.max_key_age_secs, pp.max_key_age_secs) <= $1"
        );
        let after_migration = format!(
            "SELECT v.id, v.rekey_due FROM volumes v
             WHERE {KEYED} AND v.rekey_due > 0 AND v.rekey_due <= $1"
        );
        let mut due = std::collections::HashMap::<String, i64>::new();
        for stmt in [by_policy, after_migration] {
            let rows: Vec<(String, i64)> = self
                .db
                .query_all(&stmt, [now], |r| Ok((r.get(0)?, r.get(1)?)))?;
            for (id, at) in rows {
                let e = due.entry(id).or_insert(at);
                *e = (*e).min(at);
            }
        }
        Ok(Overdue {
            volumes: due.len() as u64,
            oldest_due: due.values().copied().min().unwrap_or(0),
        })
    }

    fn console_user(&mut self, name: &str) -> Result<Option<String>> {
        self.db.query_opt(
            "SELECT password_hash FROM console_users WHERE name = $1",
            [name],
            |r| r.get(0),
        )
    }

    fn put_console_user(&mut self, name: &str, hash: &str, now: i64, by: &str) -> Result<()> {
        self.db.execute(
            "INSERT INTO console_users (name, password_hash, created, by_admin) VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) DO UPDATE SET password_hash = excluded.password_hash,
                 created = excluded.created, by_admin = excluded.by_admin",
            params![name, hash, now, by],
        )?;
        Ok(())
    }

    fn delete_console_user(&mut self, name: &str) -> Result<bool> {
        let n = self
            .db
            .execute("DELETE FROM console_users WHERE name = $1", [name])?;
        Ok(n > 0)
    }

    fn console_users(&mut self) -> Result<Vec<(String, i64, String)>> {
        self.db.query_all(
            "SELECT name, created, by_admin FROM console_users ORDER BY name",
            (),
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
    }

    fn insert_console_session(&mut self, s: &ConsoleSession) -> Result<()> {
        self.db.execute(
            "INSERT INTO console_sessions (token_hash, login, tag, csrf, started_ms, last_ms)
             VALUES ($1, $2, $3, $4, $5, $6)",
            params![
                s.token_hash,
                s.login,
                s.tag,
                s.csrf,
                s.started_ms,
                s.last_ms
            ],
        )?;
        Ok(())
    }

    fn console_session(&mut self, token_hash: &[u8]) -> Result<Option<ConsoleSession>> {
        self.db.query_opt(
            "SELECT token_hash, login, tag, csrf, started_ms, last_ms FROM console_sessions
             WHERE token_hash = $1",
            params![token_hash],
            |r| {
                Ok(ConsoleSession {
                    token_hash: r.get(0)?,
                    login: r.get(1)?,
                    tag: r.get(2)?,
                    csrf: r.get(3)?,
                    started_ms: r.get(4)?,
                    last_ms: r.get(5)?,
                })
            },
        )
    }

    fn touch_console_session(&mut self, token_hash: &[u8], now_ms: i64) -> Result<()> {
        self.db.execute(
            "UPDATE console_sessions SET last_ms = $1 WHERE token_hash = $2",
            params![now_ms, token_hash],
        )?;
        Ok(())
    }

    fn delete_console_session(&mut self, token_hash: &[u8]) -> Result<bool> {
        let n = self.db.execute(
            "DELETE FROM console_sessions WHERE token_hash = $1",
            params![token_hash],
        )?;
        Ok(n > 0)
    }

    fn prune_console_sessions(
        &mut self,
        idle_before_ms: i64,
        started_before_ms: i64,
        keep: u32,
    ) -> Result<()> {
        self.db.execute(
            "DELETE FROM console_sessions WHERE last_ms < $1",
            [idle_before_ms],
        )?;
        self.db.execute(
            "DELETE FROM console_sessions WHERE started_ms < $1",
            [started_before_ms],
        )?;
        let oldest_kept: Option<i64> = self.db.query_opt(
            "SELECT last_ms FROM console_sessions ORDER BY last_ms DESC LIMIT 1 OFFSET $1",
            [i64::from(keep)],
            |r| r.get(0),
        )?;
        if let Some(t) = oldest_kept {
            self.db
                .execute("DELETE FROM console_sessions WHERE last_ms <= $1", [t])?;
        }
        Ok(())
    }

    fn key_created(&mut self, volume_id: &str, generation: u64) -> Result<Option<i64>> {
        self.db.query_opt(
            "SELECT created FROM volume_keys WHERE volume_id = $1 AND generation = $2",
            params![volume_id, signed(generation)],
            |r| r.get(0),
        )
    }

    fn manage_pool(&mut self, p: &ManagedPool) -> Result<bool> {
        let n = self.db.execute(
            "INSERT INTO managed_pools (host, pool, since, by_admin) VALUES ($1, $2, $3, $4)
             ON CONFLICT (host, pool) DO NOTHING",
            params![p.host, p.pool, p.since, p.by],
        )?;
        Ok(n > 0)
    }

    fn unmanage_pool(&mut self, host: &str, pool: &str) -> Result<bool> {
        let n = self.db.execute(
            "DELETE FROM managed_pools WHERE host = $1 AND pool = $2",
            params![host, pool],
        )?;
        Ok(n > 0)
    }

    fn managed_pools(&mut self, host: Option<&str>) -> Result<Vec<ManagedPool>> {
        let cols = "SELECT host, pool, since, by_admin FROM managed_pools";
        match host {
            Some(h) => self.db.query_all(
                &format!("{cols} WHERE host = $1 ORDER BY host, pool"),
                [h],
                managed_pool_row,
            ),
            None => self
                .db
                .query_all(&format!("{cols} ORDER BY host, pool"), (), managed_pool_row),
        }
    }

    fn managed_pool(&mut self, host: &str, pool: &str) -> Result<Option<ManagedPool>> {
        self.db.query_opt(
            "SELECT host, pool, since, by_admin FROM managed_pools WHERE host = $1 AND pool = $2",
            params![host, pool],
            managed_pool_row,
        )
    }

    fn due_after_migration(&mut self, now: i64) -> Result<Vec<String>> {
        let stmt =
            "SELECT v.id FROM volumes v JOIN hosts h ON h.name = v.host AND h.state = 'enrolled'
             WHERE v.state = 'ready' AND v.rekey_due > 0 AND v.rekey_due <= $1";
        let rows = self.db.query_all(stmt, [now], |r| r.get(0))?;
        Ok(rows)
    }
}
