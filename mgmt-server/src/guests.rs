//! Guests: `guest define` turns an operator's libvirt domain XML into one
//! whose managed disks carry their `<encryption>` element, and queues it for
//! the host together with the keys of exactly those volumes.

use rusqlite::{OptionalExtension, params};
use serde::Serialize;
use xdr_wipe::packet::{CipherParams, KeyPacket, VolumeId};
use xdr_wipe::seal::seal;

use crate::audit;
use crate::core::{Caller, Core, CoreError, EnrolledHost};
use crate::domxml::{self, DiskSource};
use crate::names::{InvalidInput, Name};
use crate::volumes::parse_format;

/// A guest as the admin sees it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct GuestInfo {
    /// libvirt domain UUID.
    pub uuid: String,
    /// libvirt domain name.
    pub name: String,
    /// Host.
    pub host: String,
    /// Last known state.
    pub state: String,
    /// Operation waiting for the host, or empty.
    pub pending: String,
    /// Last error of the pending operation.
    pub last_error: String,
    /// Attempts of the pending operation.
    pub attempts: u32,
    /// Managed volumes it uses, by name.
    pub volumes: Vec<String>,
    /// Domain XML as sent to the host.
    pub domain_xml: String,
    /// Host it is migrating to, while it does.
    pub migrating_to: String,
}

/// A sealed key for a guest's disk.
pub struct SealedDiskKey {
    /// Volume id.
    pub volume_id: String,
    /// Generation.
    pub generation: u64,
    /// SealedPacket bytes.
    pub sealed: Vec<u8>,
}

/// What the pusher must deliver for a pending guest operation.
pub enum GuestOp {
    /// Define with these keys.
    Define {
        /// Guest.
        guest: GuestInfo,
        /// Host.
        host: EnrolledHost,
        /// One sealed key per managed disk.
        keys: Vec<SealedDiskKey>,
    },
    /// `undefine`, `start` or `stop`.
    Simple {
        /// Guest.
        guest: GuestInfo,
        /// Host.
        host: EnrolledHost,
    },
}

const GUEST_SELECT: &str = "SELECT g.uuid, g.name, g.host, g.state, g.pending, g.last_error, g.attempts, g.xml,
    COALESCE((SELECT group_concat(v.name, ',') FROM guest_disks d JOIN volumes v ON v.id = d.volume_id
              WHERE d.guest_uuid = g.uuid), ''),
    COALESCE((SELECT m.to_host FROM guest_migrations m WHERE m.guest_uuid = g.uuid), '')
    FROM guests g";

fn guest_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<GuestInfo> {
    let vols: String = r.get(8)?;
    Ok(GuestInfo {
        uuid: r.get(0)?,
        name: r.get(1)?,
        host: r.get(2)?,
        state: r.get(3)?,
        pending: r.get(4)?,
        last_error: r.get(5)?,
        attempts: r.get(6)?,
        domain_xml: r.get(7)?,
        migrating_to: r.get(9)?,
        volumes: vols
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

impl Core {
    /// Defines a guest on `host` from domain XML.
    pub fn define_guest(
        &self,
        caller: &Caller,
        host: &str,
        xml: &str,
    ) -> Result<GuestInfo, CoreError> {
        let host = Name::parse("host name", host)?;
        self.enrolled_host(host.as_str())?;
        let dom = domxml::parse(xml).map_err(|e| CoreError::Xml(e.to_string()))?;
        let mut conn = self.db();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // Which disks are managed volumes, and may they be used here?
        let mut managed: Vec<(usize, String, String, String)> = vec![]; // (disk index, volume id, secret uuid, target)
        for (i, disk) in dom.disks.iter().enumerate() {
            if !matches!(disk.device.as_str(), "disk" | "lun") {
                continue;
            }
            let found: Option<(String, String, String, String, String)> = match &disk.source {
                DiskSource::Volume { pool, volume } => {
                    let row = tx
                        .query_row(
                            "SELECT id, host, pool, secret_uuid, state FROM volumes WHERE name = ?1 AND state != 'deleted'",
                            [volume],
                            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
                        )
                        .optional()?;
                    match row {
                        Some(r) if &r.2 != pool => {
                            return Err(CoreError::Invalid(bad_disk(disk, format!("volume {volume} is in pool {}, not {pool}", r.2))));
                        }
                        Some(r) => Some(r),
                        None => {
                            return Err(CoreError::Invalid(bad_disk(
                                disk,
                                format!("volume {volume} in pool {pool} is not managed by guestkey: create it with `guestkeyctl volume create`"),
                            )));
                        }
                    }
                }
                DiskSource::File(path) => tx
                    .query_row(
                        "SELECT id, host, pool, secret_uuid, state FROM volumes WHERE path = ?1 AND path != '' AND state != 'deleted'",
                        [path],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
                    )
                    .optional()?,
                DiskSource::Other => None,
            };
            if let Some((id, vol_host, _, secret_uuid, state)) = found {
                if vol_host != host.as_str() {
                    return Err(CoreError::Invalid(bad_disk(
                        disk,
                        format!(
                            "its volume is on host {vol_host}, not on {host}: keys never go to another host"
                        ),
                    )));
                }
                if state != "ready" {
                    return Err(CoreError::FailedPrecondition(format!(
                        "disk {} (line {}): its volume is {state}; wait until `guestkeyctl volume show` says ready",
                        disk.target, disk.line
                    )));
                }
                managed.push((i, id, secret_uuid, disk.target.clone()));
            }
        }
        let uuid = match &dom.uuid {
            Some(u) => u.to_ascii_lowercase(),
            None => uuid::Uuid::new_v4().to_string(),
        };
        let live: i64 = tx.query_row(
            "SELECT COUNT(*) FROM guests WHERE (uuid = ?1 OR (host = ?2 AND name = ?3)) AND state != 'undefined'",
            params![uuid, host.as_str(), dom.name],
            |r| r.get(0),
        )?;
        if live > 0 {
            return Err(CoreError::AlreadyExists(format!(
                "a guest with UUID {uuid} or named {} on host {host} is already defined: undefine it first",
                dom.name
            )));
        }
        let secrets: Vec<(usize, String)> =
            managed.iter().map(|(i, _, s, _)| (*i, s.clone())).collect();
        let new_xml = domxml::rewrite(
            xml,
            &dom,
            &secrets,
            dom.uuid.is_none().then_some(uuid.as_str()),
        );
        // A guest once undefined may come back with the same UUID.
        tx.execute("DELETE FROM guest_disks WHERE guest_uuid = ?1", [&uuid])?;
        tx.execute(
            "DELETE FROM guests WHERE uuid = ?1 AND state = 'undefined'",
            [&uuid],
        )?;
        tx.execute(
            "INSERT INTO guests (uuid, name, host, xml, state, pending, created) VALUES (?1, ?2, ?3, ?4, 'pending-define', 'define', ?5)",
            params![uuid, dom.name, host.as_str(), new_xml, crate::db::now_unix()],
        )?;
        for (_, vol, _, target) in &managed {
            tx.execute(
                "INSERT INTO guest_disks (guest_uuid, volume_id, target) VALUES (?1, ?2, ?3)",
                params![uuid, vol, target],
            )?;
        }
        audit::append(
            &tx,
            &caller.actor(),
            "guest.define-requested",
            &uuid,
            &format!(
                "guest {} on host {host}, {} encrypted disks",
                dom.name,
                managed.len()
            ),
        )?;
        tx.commit()?;
        drop(conn);
        self.push_wake.notify_one();
        self.get_guest(&uuid)
    }

    /// Guests, optionally of one host; undefined ones left out.
    pub fn list_guests(&self, host: Option<&str>) -> Result<Vec<GuestInfo>, CoreError> {
        let conn = self.db();
        let mut stmt = conn.prepare(&format!("{GUEST_SELECT} WHERE g.state != 'undefined' AND (?1 IS NULL OR g.host = ?1) ORDER BY g.host, g.name"))?;
        let rows = stmt.query_map([host], guest_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// A guest by UUID, or by name if only one live guest has it.
    pub fn get_guest(&self, name_or_uuid: &str) -> Result<GuestInfo, CoreError> {
        let conn = self.db();
        if let Some(g) = conn
            .query_row(
                &format!("{GUEST_SELECT} WHERE g.uuid = ?1"),
                [name_or_uuid.to_ascii_lowercase()],
                guest_row,
            )
            .optional()?
        {
            return Ok(g);
        }
        let mut stmt = conn.prepare(&format!(
            "{GUEST_SELECT} WHERE g.name = ?1 AND g.state != 'undefined'"
        ))?;
        let mut found: Vec<GuestInfo> = stmt
            .query_map([name_or_uuid], guest_row)?
            .collect::<Result<_, _>>()?;
        match found.len() {
            0 => Err(CoreError::NotFound(format!(
                "no guest named or with UUID {name_or_uuid:?}: see `guestkeyctl guest list`"
            ))),
            1 => Ok(found.remove(0)),
            _ => Err(CoreError::FailedPrecondition(format!(
                "several hosts have a guest named {name_or_uuid}: use its UUID"
            ))),
        }
    }

    /// Queues `undefine`, `start` or `stop`.
    pub fn guest_action(
        &self,
        caller: &Caller,
        name_or_uuid: &str,
        action: &'static str,
    ) -> Result<GuestInfo, CoreError> {
        let g = self.get_guest(name_or_uuid)?;
        if g.state == "undefined" {
            return Err(CoreError::FailedPrecondition(format!(
                "guest {} is undefined",
                g.name
            )));
        }
        // Only an enrolled host is told anything (a revoked one would leave
        // the action pending for good).
        self.enrolled_host(&g.host)?;
        if !g.migrating_to.is_empty() {
            return Err(CoreError::FailedPrecondition(format!(
                "guest {} is migrating to host {}: finish the migration first (`guestkeyctl guest migrate {} --to {}`)",
                g.name, g.migrating_to, g.name, g.migrating_to
            )));
        }
        if !g.pending.is_empty() && g.pending != action {
            return Err(CoreError::FailedPrecondition(format!(
                "guest {} is waiting for `{}` on host {} ({}): try again when it is done",
                g.name,
                g.pending,
                g.host,
                if g.last_error.is_empty() {
                    "in progress"
                } else {
                    &g.last_error
                }
            )));
        }
        let mut conn = self.db();
        let tx = conn.transaction()?;
        tx.execute(
            "UPDATE guests SET pending = ?1, attempts = 0, next_attempt = 0, last_error = '' WHERE uuid = ?2",
            params![action, g.uuid],
        )?;
        audit::append(
            &tx,
            &caller.actor(),
            &format!("guest.{action}-requested"),
            &g.uuid,
            &format!("guest {}", g.name),
        )?;
        tx.commit()?;
        drop(conn);
        self.push_wake.notify_one();
        self.get_guest(&g.uuid)
    }

    /// Guests whose pending operation is due.
    pub fn due_guests(&self, limit: u32) -> Result<Vec<GuestInfo>, CoreError> {
        let conn = self.db();
        let mut stmt = conn.prepare(&format!("{GUEST_SELECT} WHERE g.pending != '' AND g.next_attempt <= ?1 ORDER BY g.next_attempt LIMIT ?2"))?;
        let rows = stmt.query_map(params![crate::volumes::now_unix_ms(), limit], guest_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Prepares a guest push; a definition releases the guest's keys (each
    /// audited first, fail closed).
    pub fn prepare_guest_push(&self, guest: &GuestInfo) -> Result<GuestOp, CoreError> {
        let host = self.enrolled_host(&guest.host)?;
        if guest.pending != "define" {
            return Ok(GuestOp::Simple {
                guest: guest.clone(),
                host,
            });
        }
        let mut conn = self.db();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let rows: Vec<(String, i64, String, String, Vec<u8>)> = {
            let mut stmt = tx.prepare(
                "SELECT v.id, v.generation, v.format, k.master_key_id, k.wrapped
                 FROM guest_disks d JOIN volumes v ON v.id = d.volume_id
                 JOIN volume_keys k ON k.volume_id = v.id AND k.generation = v.generation
                 WHERE d.guest_uuid = ?1 AND v.host = ?2",
            )?;
            let it = stmt.query_map(params![guest.uuid, host.name], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?;
            it.collect::<Result<_, _>>()?
        };
        for _ in &rows {
            self.take_release_slot(&host.name)?;
        }
        let host_id = xdr_wipe::XdrString::new(host.name.clone())
            .map_err(|e| CoreError::Internal(e.to_string()))?;
        let mut keys = Vec::with_capacity(rows.len());
        for (id, generation, format, mk_id, wrapped) in rows {
            let generation = generation as u64;
            audit::append(
                &tx,
                "server",
                "key.released",
                &id,
                &format!(
                    "generation {generation} sealed to host {} for guest {}",
                    host.name, guest.name
                ),
            )?;
            let key = self
                .master_for(&tx)?
                .unwrap_key(&id, generation, &mk_id, &wrapped)
                .map_err(|e| CoreError::Internal(e.to_string()))?;
            let vid = VolumeId(
                uuid::Uuid::parse_str(&id).map_err(|e| CoreError::Internal(e.to_string()))?,
            );
            let packet = KeyPacket::passphrase(
                vid,
                generation,
                CipherParams::aes_xts(parse_format(&format)?),
                key,
            );
            let sealed = seal(&packet, &host_id, &host.sealing_key)
                .map_err(|e| CoreError::Internal(e.to_string()))?
                .to_bytes();
            keys.push(SealedDiskKey {
                volume_id: id,
                generation,
                sealed,
            });
        }
        tx.commit()?;
        Ok(GuestOp::Define {
            guest: guest.clone(),
            host,
            keys,
        })
    }

    /// Records a confirmed guest push and the state the host reported.
    pub fn guest_push_succeeded(
        &self,
        guest: &GuestInfo,
        host_state: &str,
    ) -> Result<(), CoreError> {
        let state = match (guest.pending.as_str(), host_state) {
            ("undefine", _) => "undefined",
            (_, "") => "defined",
            (_, s) => s,
        };
        let mut conn = self.db();
        let tx = conn.transaction()?;
        tx.execute(
            "UPDATE guests SET state = ?1, pending = '', last_error = '', attempts = 0 WHERE uuid = ?2 AND pending = ?3",
            params![state, guest.uuid, guest.pending],
        )?;
        let action = match guest.pending.as_str() {
            "define" => "key.pushed",
            other => match other {
                "undefine" => "guest.undefined",
                "start" => "guest.started",
                _ => "guest.stopped",
            },
        };
        audit::append(
            &tx,
            "server",
            action,
            &guest.uuid,
            &format!("guest {} on host {}: {state}", guest.name, guest.host),
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Records a failed guest push and when to retry.
    pub fn guest_push_failed(&self, guest: &GuestInfo, error: &str) -> Result<(), CoreError> {
        let delay = self.retry_delay_ms(guest.attempts);
        self.db().execute(
            "UPDATE guests SET attempts = attempts + 1, last_error = ?1, next_attempt = ?2 WHERE uuid = ?3",
            params![error, crate::volumes::now_unix_ms() + delay as i64, guest.uuid],
        )?;
        Ok(())
    }
}

/// After volume `v` (at `path`) was encrypted from cleartext: every guest
/// of its host defined through guestkey with a disk on it gets the disk's
/// `<encryption>` element and is queued for a new definition, which brings
/// the host the volume's key. Returns their UUIDs.
pub(crate) fn adopt_volume(
    tx: &rusqlite::Transaction<'_>,
    v: &crate::volumes::VolumeInfo,
    path: &str,
) -> Result<Vec<String>, CoreError> {
    let guests: Vec<(String, String)> = {
        let mut stmt = tx.prepare(
            "SELECT uuid, xml FROM guests WHERE host = ?1 AND state != 'undefined' AND pending IN ('', 'define')",
        )?;
        let rows = stmt.query_map([&v.host], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect::<Result<_, _>>()?
    };
    let mut adopted = vec![];
    for (uuid, xml) in guests {
        let Ok(dom) = domxml::parse(&xml) else {
            continue;
        };
        let Some(i) = dom.disks.iter().position(|d| match &d.source {
            DiskSource::Volume { pool, volume } => pool == &v.pool && volume == &v.name,
            DiskSource::File(p) => p == path,
            DiskSource::Other => false,
        }) else {
            continue;
        };
        let new_xml = domxml::rewrite(&xml, &dom, &[(i, v.secret_uuid.clone())], None);
        tx.execute(
            "INSERT OR IGNORE INTO guest_disks (guest_uuid, volume_id, target) VALUES (?1, ?2, ?3)",
            params![uuid, v.id, dom.disks[i].target],
        )?;
        tx.execute(
            "UPDATE guests SET xml = ?1, pending = 'define', attempts = 0, next_attempt = 0, last_error = '' WHERE uuid = ?2",
            params![new_xml, uuid],
        )?;
        adopted.push(uuid);
    }
    Ok(adopted)
}

fn bad_disk(disk: &domxml::Disk, why: String) -> InvalidInput {
    InvalidInput {
        what: "disk",
        value: format!("{} (line {})", disk.target, disk.line),
        why,
    }
}
