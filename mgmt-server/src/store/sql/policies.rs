//! `policies` in SQLite, and the scheduler's queries over them.

use super::{Row, SqlTx, signed, typed, unsigned};
use crate::model::{Policy, PolicyScope, RekeyKind};
use crate::store::{PolicyStore, Result};

const POLICY_COLUMNS: &str =
    "scope, target, max_key_age_secs, mode, COALESCE(after_migration_secs, 0)";

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

    fn due_after_migration(&mut self, now: i64) -> Result<Vec<String>> {
        let stmt =
            "SELECT v.id FROM volumes v JOIN hosts h ON h.name = v.host AND h.state = 'enrolled'
             WHERE v.state = 'ready' AND v.rekey_due > 0 AND v.rekey_due <= $1";
        let rows = self.db.query_all(stmt, [now], |r| r.get(0))?;
        Ok(rows)
    }
}
