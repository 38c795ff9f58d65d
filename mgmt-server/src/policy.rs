//! Key rotation policies and the scheduler that applies them.
//!
//! A policy names a pool (every pool of that name, on any host) or one
//! volume, a maximum key age and a mode (shallow or deep). A volume's own
//! policy wins over its pool's. The scheduler asks for a rekey of every
//! ready volume whose active key is older than its policy allows.

use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use crate::audit;
use crate::core::{Caller, Core, CoreError};
use crate::db::now_unix;
use crate::names::{InvalidInput, Name};

/// A rotation policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// `pool` or `volume`.
    pub scope: String,
    /// Pool name, or volume UUID.
    pub target: String,
    /// Maximum key age.
    pub max_key_age_secs: u64,
    /// `shallow` or `deep`.
    pub mode: String,
    /// Deep rekey this long after a migration (0: none).
    pub after_migration_secs: u64,
}

/// Parses a duration: a whole number with s, m, h or d (e.g. `90d`).
pub fn parse_duration(value: &str) -> Result<u64, InvalidInput> {
    let bad = |why: &str| InvalidInput {
        what: "duration",
        value: value.to_owned(),
        why: why.to_owned(),
    };
    let v = value.trim();
    let (num, unit) = v.split_at(v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| bad("give a whole number with s, m, h or d, e.g. 90d"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad("the unit must be s, m, h or d, e.g. 90d")),
    };
    match n.checked_mul(mult) {
        Some(0) => Err(bad("must be longer than 0")),
        Some(s) if s <= 100 * 365 * 86_400 => Ok(s),
        _ => Err(bad("at most 100 years")),
    }
}

impl Core {
    /// Sets (or replaces) a policy.
    pub fn set_policy(&self, caller: &Caller, p: &Policy) -> Result<Policy, CoreError> {
        let target = match p.scope.as_str() {
            "pool" => Name::parse("pool name", &p.target)?.to_string(),
            "volume" => self.get_volume(&p.target)?.id,
            _ => {
                return Err(InvalidInput {
                    what: "policy scope",
                    value: p.scope.clone(),
                    why: "use pool or volume".into(),
                }
                .into());
            }
        };
        if !matches!(p.mode.as_str(), "shallow" | "deep") {
            return Err(InvalidInput {
                what: "mode",
                value: p.mode.clone(),
                why: "use shallow or deep".into(),
            }
            .into());
        }
        if p.max_key_age_secs == 0 {
            return Err(InvalidInput {
                what: "max key age",
                value: "0".into(),
                why: "must be longer than 0".into(),
            }
            .into());
        }
        let mut conn = self.db();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO policies (scope, target, max_key_age_secs, mode, after_migration_secs) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (scope, target) DO UPDATE SET max_key_age_secs = excluded.max_key_age_secs,
                 mode = excluded.mode, after_migration_secs = excluded.after_migration_secs",
            params![p.scope, target, p.max_key_age_secs as i64, p.mode, (p.after_migration_secs > 0).then_some(p.after_migration_secs as i64)],
        )?;
        audit::append(
            &tx,
            &caller.actor(),
            "policy.set",
            &target,
            &format!(
                "{} {}: max key age {} s, {}",
                p.scope, target, p.max_key_age_secs, p.mode
            ),
        )?;
        tx.commit()?;
        Ok(Policy {
            target,
            ..p.clone()
        })
    }

    /// All policies.
    pub fn list_policies(&self) -> Result<Vec<Policy>, CoreError> {
        let conn = self.db();
        let mut stmt = conn.prepare("SELECT scope, target, max_key_age_secs, mode, COALESCE(after_migration_secs, 0) FROM policies ORDER BY scope, target")?;
        let rows = stmt.query_map([], |r| {
            Ok(Policy {
                scope: r.get(0)?,
                target: r.get(1)?,
                max_key_age_secs: r.get::<_, i64>(2)? as u64,
                mode: r.get(3)?,
                after_migration_secs: r.get::<_, i64>(4)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Removes a policy.
    pub fn remove_policy(
        &self,
        caller: &Caller,
        scope: &str,
        target: &str,
    ) -> Result<Policy, CoreError> {
        let target = if scope == "volume" {
            self.get_volume(target)?.id
        } else {
            target.to_owned()
        };
        let found = self
            .list_policies()?
            .into_iter()
            .find(|p| p.scope == scope && p.target == target);
        let Some(p) = found else {
            return Err(CoreError::NotFound(format!(
                "no {scope} policy for {target}: see `guestkeyctl policy list`"
            )));
        };
        let mut conn = self.db();
        let tx = conn.transaction()?;
        tx.execute(
            "DELETE FROM policies WHERE scope = ?1 AND target = ?2",
            params![scope, target],
        )?;
        audit::append(&tx, &caller.actor(), "policy.removed", &target, scope)?;
        tx.commit()?;
        Ok(p)
    }

    /// The scheduler's round: rekeys every ready volume whose active key is
    /// older than its policy allows, and deep-rekeys every volume whose
    /// after-migration rekey is due. Volumes of revoked hosts wait (no key
    /// goes to them). Returns the volumes rekeyed.
    pub fn apply_policies(&self) -> Result<Vec<String>, CoreError> {
        let now = now_unix();
        let due: Vec<(String, String)> = {
            let conn = self.db();
            let mut stmt = conn.prepare(
                "SELECT v.id, COALESCE(pv.mode, pp.mode)
                 FROM volumes v
                 JOIN volume_keys k ON k.volume_id = v.id AND k.generation = v.generation
                 JOIN hosts h ON h.name = v.host AND h.state = 'enrolled'
                 LEFT JOIN policies pv ON pv.scope = 'volume' AND pv.target = v.id
                 LEFT JOIN policies pp ON pp.scope = 'pool' AND pp.target = v.pool
                 WHERE v.state = 'ready'
                   AND COALESCE(pv.max_key_age_secs, pp.max_key_age_secs) IS NOT NULL
                   AND k.created + COALESCE(pv.max_key_age_secs, pp.max_key_age_secs) <= ?1",
            )?;
            let rows = stmt.query_map([now], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        // Deep rekeys due after a migration (the source's QEMU held the
        // data key), whatever the age of the key.
        let migrated: Vec<String> = {
            let conn = self.db();
            let mut stmt = conn.prepare(
                "SELECT v.id FROM volumes v JOIN hosts h ON h.name = v.host AND h.state = 'enrolled'
                 WHERE v.state = 'ready' AND v.rekey_due > 0 AND v.rekey_due <= ?1",
            )?;
            let rows = stmt.query_map([now], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut due = due;
        due.retain(|(id, _)| !migrated.contains(id));
        due.extend(migrated.into_iter().map(|id| (id, "deep".to_owned())));
        let mut done = vec![];
        for (id, mode) in due {
            match self.request_rekey(&Caller::Scheduler, &id, mode == "deep", "", 0) {
                Ok(_) => done.push(id),
                Err(e) => tracing::warn!(volume = %id, error = %e, "scheduled rekey not started"),
            }
        }
        Ok(done)
    }

    /// The policy that applies to a volume, if any.
    pub fn policy_of(&self, volume_id: &str, pool: &str) -> Result<Option<Policy>, CoreError> {
        let conn = self.db();
        let row = conn
            .query_row(
                "SELECT scope, target, max_key_age_secs, mode, COALESCE(after_migration_secs, 0) FROM policies
                 WHERE (scope = 'volume' AND target = ?1) OR (scope = 'pool' AND target = ?2)
                 ORDER BY scope = 'volume' DESC LIMIT 1",
                params![volume_id, pool],
                |r| {
                    Ok(Policy {
                        scope: r.get(0)?,
                        target: r.get(1)?,
                        max_key_age_secs: r.get::<_, i64>(2)? as u64,
                        mode: r.get(3)?,
                        after_migration_secs: r.get::<_, i64>(4)? as u64,
                    })
                },
            )
            .optional()?;
        Ok(row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90d").unwrap(), 90 * 86_400);
        assert_eq!(parse_duration("2s").unwrap(), 2);
        assert_eq!(parse_duration("12h").unwrap(), 43_200);
        for bad in ["", "d", "-1d", "0s", "5y", "1.5d", "999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
