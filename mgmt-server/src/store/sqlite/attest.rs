//! `host_attestation`, `attestation_allow` and `attestation_versions` in
//! SQLite.

use rusqlite::{OptionalExtension, params};

use super::{SqliteTx, signed, unsigned};
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

impl AttestStore for SqliteTx<'_> {
    fn set_host_identity(&mut self, host: &str, id: &HostIdentity) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO host_attestation
                     (host, ek_public, ek_certificate, ak_public, challenge_hash, pinned)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                host,
                id.ek_public,
                id.ek_certificate,
                id.ak_public,
                id.challenge_hash,
                id.pinned
            ])?;
        Ok(())
    }

    fn host_identity(&mut self, host: &str) -> Result<Option<HostIdentity>> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT ek_public, ek_certificate, ak_public, challenge_hash, pinned
                 FROM host_attestation WHERE host = ?1",
            )?
            .query_row([host], |r| {
                Ok(HostIdentity {
                    ek_public: r.get(0)?,
                    ek_certificate: r.get(1)?,
                    ak_public: r.get(2)?,
                    challenge_hash: r.get(3)?,
                    pinned: r.get(4)?,
                })
            })
            .optional()?)
    }

    fn pin_attestation_key(&mut self, host: &str) -> Result<()> {
        self.conn
            .prepare_cached(
                "UPDATE host_attestation SET pinned = 1, challenge_hash = NULL WHERE host = ?1",
            )?
            .execute([host])?;
        Ok(())
    }

    fn record_attestation(
        &mut self,
        host: &str,
        o: &AttestationOutcome,
        clock: Option<TpmClock>,
    ) -> Result<()> {
        self.conn
            .prepare_cached(
                "UPDATE host_attestation SET last_at = ?2, last_ok = ?3, last_detail = ?4,
                     last_differing = ?5 WHERE host = ?1 AND last_at <= ?2",
            )?
            .execute(params![
                host,
                o.at_unix,
                o.ok,
                o.detail,
                differing_text(&o.differing)
            ])?;
        // An outcome issued before the one recorded is older: it changes
        // nothing (it is audited all the same).
        let current: i64 = self
            .conn
            .prepare_cached("SELECT last_at FROM host_attestation WHERE host = ?1")?
            .query_row([host], |r| r.get(0))
            .optional()?
            .unwrap_or(0);
        if current != o.at_unix {
            return Ok(());
        }
        if let Some(c) = clock {
            self.conn
                .prepare_cached(
                    "UPDATE host_attestation SET clock = ?2, reset_count = ?3, restart_count = ?4
                     WHERE host = ?1",
                )?
                .execute(params![
                    host,
                    signed(c.clock),
                    c.reset_count,
                    c.restart_count
                ])?;
        }
        Ok(())
    }

    fn attestation(
        &mut self,
        host: &str,
    ) -> Result<(Option<AttestationOutcome>, Option<TpmClock>)> {
        let row = self
            .conn
            .prepare_cached(
                "SELECT last_at, last_ok, last_detail, last_differing, clock, reset_count,
                        restart_count
                 FROM host_attestation WHERE host = ?1",
            )?
            .query_row([host], |r| {
                let at: i64 = r.get(0)?;
                let outcome = (at > 0)
                    .then(|| -> rusqlite::Result<AttestationOutcome> {
                        Ok(AttestationOutcome {
                            at_unix: at,
                            ok: r.get(1)?,
                            detail: r.get(2)?,
                            differing: differing_list(&r.get::<_, String>(3)?),
                        })
                    })
                    .transpose()?;
                let clock = match r.get::<_, Option<i64>>(4)? {
                    Some(_) => Some(TpmClock {
                        clock: unsigned(r, 4)?,
                        reset_count: r.get(5)?,
                        restart_count: r.get(6)?,
                    }),
                    None => None,
                };
                Ok((outcome, clock))
            })
            .optional()?;
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
        let version: i64 = self
            .conn
            .prepare_cached(
                "SELECT COALESCE(MAX(version), 0) FROM attestation_versions
                 WHERE scope = ?1 AND target = ?2",
            )?
            .query_row(params![scope, target], |r| r.get(0))?;
        let version = version + 1;
        if replace {
            let mut delete = self.conn.prepare_cached(
                "DELETE FROM attestation_allow WHERE scope = ?1 AND target = ?2 AND pcr = ?3",
            )?;
            for (pcr, _) in values {
                delete.execute(params![scope, target, pcr])?;
            }
        }
        {
            let mut insert = self.conn.prepare_cached(
                "INSERT OR IGNORE INTO attestation_allow (scope, target, pcr, sha256, version, added)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for (pcr, value) in values {
                insert.execute(params![scope, target, pcr, value, version, now])?;
            }
        }
        self.conn
            .prepare_cached(
                "INSERT INTO attestation_versions (scope, target, version) VALUES (?1, ?2, ?3)
                 ON CONFLICT (scope, target) DO UPDATE SET version = excluded.version",
            )?
            .execute(params![scope, target, version])?;
        Ok(version as u64)
    }

    fn allowlist(&mut self, scope: AllowScope, target: &str) -> Result<(u64, Vec<(u8, String)>)> {
        let scope = scope.as_str();
        let version: Option<i64> = self
            .conn
            .prepare_cached(
                "SELECT version FROM attestation_versions WHERE scope = ?1 AND target = ?2",
            )?
            .query_row(params![scope, target], |r| r.get(0))
            .optional()?;
        let mut stmt = self.conn.prepare_cached(
            "SELECT pcr, sha256 FROM attestation_allow WHERE scope = ?1 AND target = ?2
             ORDER BY pcr, sha256",
        )?;
        let rows = stmt.query_map(params![scope, target], |r| {
            Ok((r.get::<_, u8>(0)?, r.get(1)?))
        })?;
        let values = rows.collect::<rusqlite::Result<_>>()?;
        Ok((version.unwrap_or(0).max(0) as u64, values))
    }

    fn host_group(&mut self, host: &str) -> Result<String> {
        Ok(self
            .conn
            .prepare_cached("SELECT host_group FROM hosts WHERE name = ?1")?
            .query_row([host], |r| r.get(0))
            .optional()?
            .unwrap_or_default())
    }

    fn set_host_group(&mut self, host: &str, group: &str) -> Result<()> {
        self.conn
            .prepare_cached("UPDATE hosts SET host_group = ?2 WHERE name = ?1")?
            .execute(params![host, group])?;
        Ok(())
    }
}
