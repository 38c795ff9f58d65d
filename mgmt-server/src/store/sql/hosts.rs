//! `hosts` and `host_inventory`.

use super::{Row, SqlTx, signed, typed, unsigned};
use crate::model::{HostInfo, HostState, HostTpm};
use crate::store::{Enrollment, HeldKey, HostRecord, HostStore, NewHost, Result, TokenHolder};

const HOST_SELECT: &str = "SELECT h.name, h.address, h.state, h.created, COALESCE(h.enrolled, 0),
        COALESCE(h.cert_sha256, ''),
        (SELECT COUNT(*) FROM volumes v WHERE v.host = h.name AND v.state != 'deleted'),
        (SELECT COUNT(*) FROM host_inventory i WHERE i.host = h.name), h.inventory_reported,
        h.libvirt_uri, h.migration_uri, h.tpm, h.host_group
    FROM hosts h";

fn host_row(r: &Row) -> Result<HostInfo> {
    Ok(HostInfo {
        name: r.get(0)?,
        address: r.get(1)?,
        state: typed(r, 2, "hosts.state")?,
        created_unix: r.get(3)?,
        enrolled_unix: r.get(4)?,
        certificate_sha256: r.get(5)?,
        volume_count: r.get(6)?,
        held_keys: r.get(7)?,
        inventory_reported_unix: r.get(8)?,
        libvirt_uri: r.get(9)?,
        migration_uri: r.get(10)?,
        tpm: {
            let text: String = r.get(11)?;
            // Written by set_host_tpm from the same type: a row that does
            // not parse shows as nothing reported.
            serde_json::from_str(&text).ok()
        },
        // Filled in by the domain (`Core::host_attestation`).
        attestation: None,
        group: r.get(12)?,
    })
}

impl HostStore for SqlTx<'_> {
    fn set_host_tpm(&mut self, name: &str, tpm: &HostTpm) -> Result<()> {
        let text = serde_json::to_string(tpm).expect("HostTpm serializes");
        self.db.execute(
            "UPDATE hosts SET tpm = $2 WHERE name = $1",
            params![name, text],
        )?;
        Ok(())
    }

    fn host_exists(&mut self, name: &str) -> Result<bool> {
        let n: i64 =
            self.db
                .query_one("SELECT COUNT(*) FROM hosts WHERE name = $1", [name], |r| {
                    r.get(0)
                })?;
        Ok(n > 0)
    }

    fn insert_host(&mut self, h: &NewHost) -> Result<()> {
        self.db.execute(
            "INSERT INTO hosts (name, address, state, token_hash, token_expires, created)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            params![
                h.name,
                h.address,
                HostState::PendingEnrollment.as_str(),
                h.token_hash,
                h.token_expires,
                h.created
            ],
        )?;
        Ok(())
    }

    fn hosts(&mut self) -> Result<Vec<HostInfo>> {
        self.db
            .query_all(&format!("{HOST_SELECT} ORDER BY h.name"), (), host_row)
    }

    fn host(&mut self, name: &str) -> Result<Option<HostInfo>> {
        self.db.query_opt(
            &format!("{HOST_SELECT} WHERE h.name = $1"),
            [name],
            host_row,
        )
    }

    fn host_record(&mut self, name: &str) -> Result<Option<HostRecord>> {
        self.db.query_opt(
            "SELECT name, address, state, sealing_public_key, libvirt_uri, migration_uri,
                        cert_sha256
                 FROM hosts WHERE name = $1",
            [name],
            |r| {
                Ok(HostRecord {
                    name: r.get(0)?,
                    address: r.get(1)?,
                    state: typed(r, 2, "hosts.state")?,
                    sealing_key: r.get(3)?,
                    libvirt_uri: r.get(4)?,
                    migration_uri: r.get(5)?,
                    cert_sha256: r.get(6)?,
                })
            },
        )
    }

    fn enrolled_host_by_cert(&mut self, cert_sha256: &str) -> Result<Option<String>> {
        self.db.query_opt(
            "SELECT name FROM hosts WHERE cert_sha256 = $1 AND state = $2",
            params![cert_sha256, HostState::Enrolled.as_str()],
            |r| r.get(0),
        )
    }

    fn revoke_host(&mut self, name: &str) -> Result<bool> {
        let revoked = HostState::Revoked.as_str();
        let n = self.db.execute(
            "UPDATE hosts SET state = $1, token_hash = NULL WHERE name = $2 AND state != $1",
            params![revoked, name],
        )?;
        Ok(n > 0)
    }

    fn host_by_token(&mut self, token_hash: &[u8]) -> Result<Option<TokenHolder>> {
        self.db.query_opt(
            "SELECT name, address, state, token_expires FROM hosts WHERE token_hash = $1",
            [token_hash],
            |r| {
                Ok(TokenHolder {
                    name: r.get(0)?,
                    address: r.get(1)?,
                    state: typed(r, 2, "hosts.state")?,
                    expires: r.get(3)?,
                })
            },
        )
    }

    fn complete_enrollment(&mut self, e: &Enrollment) -> Result<bool> {
        // The token and state are checked again here, so two concurrent
        // enrollments with one token cannot both succeed.
        let n = self.db.execute(
            "UPDATE hosts SET state = $1, token_hash = NULL, token_expires = NULL,
                     enrolled = $2, cert_sha256 = $3, sealing_public_key = $4
                 WHERE name = $5 AND token_hash = $6 AND state = $7",
            params![
                HostState::Enrolled.as_str(),
                e.enrolled,
                e.cert_sha256,
                e.sealing_key,
                e.name,
                e.token_hash,
                HostState::PendingEnrollment.as_str()
            ],
        )?;
        Ok(n == 1)
    }

    fn inventory(&mut self, host: &str) -> Result<Vec<HeldKey>> {
        self.db.query_all(
            "SELECT volume_id, generation, guest_uuid FROM host_inventory WHERE host = $1
             ORDER BY volume_id, generation, guest_uuid",
            [host],
            |r| {
                Ok(HeldKey {
                    volume_id: r.get(0)?,
                    generation: unsigned(r, 1)?,
                    guest_uuid: r.get(2)?,
                })
            },
        )
    }

    fn replace_inventory(&mut self, host: &str, held: &[HeldKey], now: i64) -> Result<()> {
        self.db
            .execute("DELETE FROM host_inventory WHERE host = $1", [host])?;
        {
            let insert = "INSERT INTO host_inventory (host, volume_id, generation, guest_uuid)
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING";
            for k in held {
                self.db.execute(
                    insert,
                    params![host, k.volume_id, signed(k.generation), k.guest_uuid],
                )?;
            }
        }
        self.db.execute(
            "UPDATE hosts SET inventory_reported = $1 WHERE name = $2",
            params![now, host],
        )?;
        Ok(())
    }

    fn set_host_migration(
        &mut self,
        name: &str,
        libvirt_uri: &str,
        migration_uri: &str,
    ) -> Result<()> {
        self.db.execute(
            "UPDATE hosts SET libvirt_uri = $1, migration_uri = $2 WHERE name = $3",
            params![libvirt_uri, migration_uri, name],
        )?;
        Ok(())
    }
}
