//! `host_attestation`, `attestation_allow` and `attestation_versions` in
//! SQLite.

use super::{SqlTx, signed, unsigned};
use crate::model::{AllowScope, AttestationOutcome, TpmClock};
use crate::store::{AttestStore, HostIdentity, Result};

fn differing_text(pcrs: &[u8]) -> String {
    pcrs.iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn differing_list(text: &str) -> Vec<u8> {
    text.split(',').filter_map(|p| p.parse().ok()).collect()
}

impl AttestStore for SqlTx<'_> {
    fn set_host_identity(&mut self, host: &str, id: &HostIdentity) -> Result<()> {
        self.db.execute(
            "INSERT INTO host_attestation
                     (host, ek_public, ek_certificate, ak_public, challenge_hash, pinned)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (host) DO UPDATE SET ek_public = excluded.ek_public,
                     ek_certificate = excluded.ek_certificate, ak_public = excluded.ak_public,
                     challenge_hash = excluded.challenge_hash, pinned = excluded.pinned,
                     last_at = 0, last_ok = 0, last_detail = '', last_differing = '',
                     clock = NULL, reset_count = NULL, restart_count = NULL",
            params![
                host,
                id.ek_public,
                id.ek_certificate,
                id.ak_public,
                id.challenge_hash,
                id.pinned
            ],
        )?;
        Ok(())
    }

    fn host_identity(&mut self, host: &str) -> Result<Option<HostIdentity>> {
        self.db.query_opt(
            "SELECT ek_public, ek_certificate, ak_public, challenge_hash, pinned
                 FROM host_attestation WHERE host = $1",
            [host],
            |r| {
                Ok(HostIdentity {
                    ek_public: r.get(0)?,
                    ek_certificate: r.get(1)?,
                    ak_public: r.get(2)?,
                    challenge_hash: r.get(3)?,
                    pinned: r.get(4)?,
                })
            },
        )
    }

    fn pin_attestation_key(&mut self, host: &str) -> Result<()> {
        self.db.execute(
            "UPDATE host_attestation SET pinned = 1, challenge_hash = NULL WHERE host = $1",
            [host],
        )?;
        Ok(())
    }

    fn record_attestation(
        &mut self,
        host: &str,
        o: &AttestationOutcome,
        clock: Option<TpmClock>,
    ) -> Result<()> {
        self.db.execute(
            "UPDATE host_attestation SET last_at = $2, last_ok = $3, last_detail = $4,
                     last_differing = $5 WHERE host = $1 AND last_at <= $2",
            params![
                host,
                o.at_unix,
                o.ok,
                o.detail,
                differing_text(&o.differing)
            ],
        )?;
        // An outcome issued before the one recorded is older: it changes
        // nothing (it is audited all the same).
        let current: i64 = self
            .db
            .query_opt(
                "SELECT last_at FROM host_attestation WHERE host = $1",
                [host],
                |r| r.get(0),
            )?
            .unwrap_or(0);
        if current != o.at_unix {
            return Ok(());
        }
        if let Some(c) = clock {
            self.db.execute(
                "UPDATE host_attestation SET clock = $2, reset_count = $3, restart_count = $4
                     WHERE host = $1",
                params![host, signed(c.clock), c.reset_count, c.restart_count],
            )?;
        }
        Ok(())
    }

    fn attestation(
        &mut self,
        host: &str,
    ) -> Result<(Option<AttestationOutcome>, Option<TpmClock>)> {
        let row = self.db.query_opt(
            "SELECT last_at, last_ok, last_detail, last_differing, clock, reset_count,
                        restart_count
                 FROM host_attestation WHERE host = $1",
            [host],
            |r| {
                let at: i64 = r.get(0)?;
                let outcome = (at > 0)
                    .then(|| -> Result<AttestationOutcome> {
                        Ok(AttestationOutcome {
                            at_unix: at,
                            ok: r.get(1)?,
                            detail: r.get(2)?,
                            differing: differing_list(&r.get::<String>(3)?),
                        })
                    })
                    .transpose()?;
                let clock = match r.get::<Option<i64>>(4)? {
                    Some(_) => Some(TpmClock {
                        clock: unsigned(r, 4)?,
                        reset_count: r.get(5)?,
                        restart_count: r.get(6)?,
                    }),
                    None => None,
                };
                Ok((outcome, clock))
            },
        )?;
        Ok(row.unwrap_or((None, None)))
    }

    fn allow_pcr_values(
        &mut self,
        scope: AllowScope,
        target: &str,
        values: &[(u8, String)],
        replace: bool,
        now: i64,
    ) -> Result<u64> {
        let scope = scope.as_str();
        let version: i64 = self.db.query_one(
            "SELECT COALESCE(MAX(version), 0) FROM attestation_versions
                 WHERE scope = $1 AND target = $2",
            params![scope, target],
            |r| r.get(0),
        )?;
        let version = version + 1;
        if replace {
            let delete =
                "DELETE FROM attestation_allow WHERE scope = $1 AND target = $2 AND pcr = $3";
            for (pcr, _) in values {
                self.db.execute(delete, params![scope, target, pcr])?;
            }
        }
        {
            let insert =
                "INSERT INTO attestation_allow (scope, target, pcr, sha256, version, added)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING";
            for (pcr, value) in values {
                self.db
                    .execute(insert, params![scope, target, pcr, value, version, now])?;
            }
        }
        self.db.execute(
            "INSERT INTO attestation_versions (scope, target, version) VALUES ($1, $2, $3)
                 ON CONFLICT (scope, target) DO UPDATE SET version = excluded.version",
            params![scope, target, version],
        )?;
        Ok(version as u64)
    }

    fn allowlist(&mut self, scope: AllowScope, target: &str) -> Result<(u64, Vec<(u8, String)>)> {
        let scope = scope.as_str();
        let version: Option<i64> = self.db.query_opt(
            "SELECT version FROM attestation_versions WHERE scope = $1 AND target = $2",
            params![scope, target],
            |r| r.get(0),
        )?;
        let stmt = "SELECT pcr, sha256 FROM attestation_allow WHERE scope = $1 AND target = $2
             ORDER BY pcr, sha256";
        let rows = self.db.query_all(stmt, params![scope, target], |r| {
            Ok((r.get::<u8>(0)?, r.get(1)?))
        })?;
        let values = rows;
        Ok((version.unwrap_or(0).max(0) as u64, values))
    }

    fn host_group(&mut self, host: &str) -> Result<String> {
        Ok(self
            .db
            .query_opt(
                "SELECT host_group FROM hosts WHERE name = $1",
                [host],
                |r| r.get(0),
            )?
            .unwrap_or_default())
    }

    fn set_host_group(&mut self, host: &str, group: &str) -> Result<()> {
        self.db.execute(
            "UPDATE hosts SET host_group = $2 WHERE name = $1",
            params![host, group],
        )?;
        Ok(())
    }
}
