//! Volumes and their keys: "encrypt this volume", look-ups, crypto-shredding,
//! and the key release that precedes every push.

use rusqlite::{OptionalExtension, params};
use serde::Serialize;
use xdr_wipe::packet::{CipherParams, KeyPacket, VolumeFormat, VolumeId, generate_passphrase};
use xdr_wipe::seal::seal;

use crate::audit;
use crate::core::{Caller, Core, CoreError, EnrolledHost};
use crate::db::now_unix;
use crate::names::{InvalidInput, MAX_CAPACITY, Name};

/// A volume as the admin sees it. Holds no key.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct VolumeInfo {
    /// UUID.
    pub id: String,
    /// Name, unique among live volumes.
    pub name: String,
    /// Host it lives on.
    pub host: String,
    /// libvirt storage pool on that host.
    pub pool: String,
    /// `qcow2` or `raw`.
    pub format: String,
    /// Size in bytes.
    pub capacity_bytes: u64,
    /// Current key generation.
    pub key_generation: u64,
    /// `pending-create`, `ready`, `pending-delete`, `deleted`, `failed`.
    pub state: String,
    /// Last error of a pending operation.
    pub last_error: String,
    /// Push attempts of the pending operation.
    pub attempts: u32,
    /// libvirt secret UUID for this volume's key on the host.
    pub secret_uuid: String,
    /// Created at (Unix seconds).
    pub created_unix: i64,
    /// A deep rekey is due at this time (after a migration), 0 if none.
    pub rekey_due_unix: i64,
    /// The host's progress on the pending operation, while it runs.
    pub progress: Option<Progress>,
}

/// A host's progress on a long volume operation.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Progress {
    /// e.g. "re-encrypting".
    pub phase: String,
    /// Bytes done.
    pub done_bytes: u64,
    /// Bytes in all (0: not known).
    pub total_bytes: u64,
    /// Reporting host.
    #[serde(skip)]
    pub host: String,
    /// When reported.
    #[serde(skip)]
    pub at: Option<std::time::Instant>,
}

/// A report older than this is stale (the host reports every second).
const PROGRESS_STALE: std::time::Duration = std::time::Duration::from_secs(5);

const VOLUME_SELECT: &str =
    "SELECT id, name, host, pool, format, capacity, generation, state, last_error,
    attempts, secret_uuid, created, rekey_due FROM volumes";

fn volume_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<VolumeInfo> {
    Ok(VolumeInfo {
        id: r.get(0)?,
        name: r.get(1)?,
        host: r.get(2)?,
        pool: r.get(3)?,
        format: r.get(4)?,
        capacity_bytes: r.get::<_, i64>(5)? as u64,
        key_generation: r.get::<_, i64>(6)? as u64,
        state: r.get(7)?,
        last_error: r.get(8)?,
        attempts: r.get(9)?,
        secret_uuid: r.get(10)?,
        created_unix: r.get(11)?,
        rekey_due_unix: r.get(12)?,
        progress: None,
    })
}

/// A volume's container format.
pub fn parse_format(value: &str) -> Result<VolumeFormat, InvalidInput> {
    match value {
        "qcow2" | "" => Ok(VolumeFormat::Qcow2),
        "raw" => Ok(VolumeFormat::Raw),
        _ => Err(InvalidInput {
            what: "format",
            value: value.to_owned(),
            why: "use qcow2 or raw".into(),
        }),
    }
}

fn format_name(f: VolumeFormat) -> &'static str {
    match f {
        VolumeFormat::Qcow2 => "qcow2",
        VolumeFormat::Raw => "raw",
    }
}

/// What a host answered to a volume push: the volume's path and size
/// there, or the error.
pub type PushOutcome = Result<(String, u64), PushError>;

/// A failed push.
#[derive(Debug, Clone)]
pub struct PushError {
    /// What the host (or the network) said.
    pub message: String,
    /// The host refused for good (the request cannot be honoured as it
    /// stands): no retry.
    pub refused: bool,
}

impl PushError {
    /// A failure worth retrying.
    pub fn retry(message: String) -> Self {
        Self {
            message,
            refused: false,
        }
    }
}

/// What the pusher must deliver for one pending volume.
pub enum PushOp {
    /// Create the volume with this key, released (and audited) for the
    /// host; [`PushOp::seal`] seals it to the host for the wire.
    Create {
        /// The volume.
        volume: VolumeInfo,
        /// Where.
        host: EnrolledHost,
        /// The key packet (wiped on drop).
        packet: KeyPacket,
        /// Encrypt the existing cleartext volume instead of creating one.
        encrypt_existing: bool,
    },
    /// Turn the volume back into cleartext.
    Decrypt {
        /// The volume.
        volume: VolumeInfo,
        /// Where.
        host: EnrolledHost,
        /// Its key.
        packet: KeyPacket,
    },
    /// Replace the volume's key (shallow: new keyslot, old one erased).
    Rekey {
        /// The volume.
        volume: VolumeInfo,
        /// Where.
        host: EnrolledHost,
        /// The current key (the host may not hold it).
        old: Box<KeyPacket>,
        /// The next generation.
        new: Box<KeyPacket>,
        /// Deep (new data key) rather than shallow (new keyslot).
        deep: bool,
        /// "", "online" or "offline".
        placement: String,
        /// Bytes per second at most (0: no limit).
        bandwidth: u64,
    },
    /// Delete the volume and the host's copy of its key.
    Delete {
        /// The volume.
        volume: VolumeInfo,
        /// Where.
        host: EnrolledHost,
    },
}

/// Seals `packet` to `host` (xdr-wipe SealedPacket bytes: no clear key).
pub(crate) fn seal_for(packet: &KeyPacket, host: &EnrolledHost) -> Result<Vec<u8>, String> {
    let host_id = xdr_wipe::XdrString::new(host.name.clone()).map_err(|e| e.to_string())?;
    Ok(seal(packet, &host_id, &host.sealing_key)
        .map_err(|e| e.to_string())?
        .to_bytes())
}

impl Core {
    /// "Encrypt this volume": makes its key and queues its creation on the host.
    pub fn create_volume(
        &self,
        caller: &Caller,
        host: &str,
        pool: &str,
        name: &str,
        capacity_bytes: u64,
        format: &str,
    ) -> Result<VolumeInfo, CoreError> {
        self.new_volume(caller, host, pool, name, Some(capacity_bytes), format)
    }

    /// Brings the existing cleartext volume `name` of `pool` on `host` under
    /// guestkey: makes its key and queues its encryption on the host (its
    /// size is known once the host reports it).
    pub fn encrypt_volume(
        &self,
        caller: &Caller,
        host: &str,
        pool: &str,
        name: &str,
        format: &str,
    ) -> Result<VolumeInfo, CoreError> {
        self.new_volume(caller, host, pool, name, None, format)
    }

    /// A new volume record and key: created empty with `capacity`, or
    /// encrypted from the existing cleartext volume when `capacity` is None.
    fn new_volume(
        &self,
        caller: &Caller,
        host: &str,
        pool: &str,
        name: &str,
        capacity: Option<u64>,
        format: &str,
    ) -> Result<VolumeInfo, CoreError> {
        let host = Name::parse("host name", host)?;
        let pool = Name::parse("pool name", pool)?;
        let name = Name::parse("volume name", name)?;
        let format = parse_format(format)?;
        let (capacity_bytes, state, what) = match capacity {
            Some(c) => (c, "pending-create", "volume.create-requested"),
            // Until the host reports the real size.
            // `encrypting`: the admin's call pushes it itself (see
            // crate::convert), the pusher does not pick it up.
            None => (1, "encrypting", "volume.encrypt-requested"),
        };
        if capacity_bytes == 0 || capacity_bytes > MAX_CAPACITY {
            return Err(InvalidInput {
                what: "size",
                value: capacity_bytes.to_string(),
                why: "a volume holds from 1 byte to 1P".into(),
            }
            .into());
        }
        self.enrolled_host(host.as_str())?;
        let id = uuid::Uuid::new_v4().to_string();
        let secret_uuid = uuid::Uuid::new_v4().to_string();
        let key = generate_passphrase()
            .map_err(|_| CoreError::Internal("the OS random number generator failed".into()))?;

        let mut conn = self.db();
        // IMMEDIATE: the master key id read below cannot change before commit.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let master = self.master_for(&tx)?;
        let wrapped = master.wrap(&id, 1, &key);
        drop(key);
        let taken: i64 = tx.query_row(
            "SELECT COUNT(*) FROM volumes WHERE name = ?1 AND state NOT IN ('deleted', 'decrypted')",
            [name.as_str()],
            |r| r.get(0),
        )?;
        if taken > 0 {
            return Err(CoreError::AlreadyExists(format!(
                "a volume named {name} already exists: volume names are unique per server"
            )));
        }
        let count: u32 = tx.query_row(
            "SELECT COUNT(*) FROM volumes WHERE host = ?1 AND state != 'deleted'",
            [host.as_str()],
            |r| r.get(0),
        )?;
        if count >= self.config.limits.max_volumes_per_host {
            return Err(CoreError::Exhausted(format!(
                "host {host} has {count} volumes, the limit (limits.max_volumes_per_host) is {}",
                self.config.limits.max_volumes_per_host
            )));
        }
        let now = now_unix();
        tx.execute(
            "INSERT INTO volumes (id, name, host, pool, format, capacity, secret_uuid, generation, state, created)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 1, ?8, ?9)",
            params![id, name.as_str(), host.as_str(), pool.as_str(), format_name(format), capacity_bytes as i64, secret_uuid, state, now],
        )?;
        tx.execute(
            "INSERT INTO volume_keys (volume_id, generation, master_key_id, wrapped, created) VALUES (?1, 1, ?2, ?3, ?4)",
            params![id, master.id(), wrapped, now],
        )?;
        drop(master);
        audit::append(
            &tx,
            &caller.actor(),
            "key.created",
            &id,
            &format!("volume {name} generation 1"),
        )?;
        audit::append(
            &tx,
            &caller.actor(),
            what,
            &id,
            &format!("volume {name} on host {host} pool {pool}"),
        )?;
        tx.commit()?;
        drop(conn);
        self.push_wake.notify_one();
        self.get_volume(&id)
    }

    /// Volumes, optionally of one host, by name; deleted ones are left out.
    pub fn list_volumes(&self, host: Option<&str>) -> Result<Vec<VolumeInfo>, CoreError> {
        let conn = self.db();
        let mut stmt = conn.prepare(&format!(
            "{VOLUME_SELECT} WHERE state != 'deleted' AND (?1 IS NULL OR host = ?1) ORDER BY name"
        ))?;
        let rows = stmt.query_map([host], volume_row)?;
        let mut vols: Vec<VolumeInfo> = rows.collect::<Result<_, _>>()?;
        drop(stmt);
        drop(conn);
        for v in &mut vols {
            self.attach_progress(v);
        }
        Ok(vols)
    }

    /// A volume by name (live volumes) or UUID (any).
    pub fn get_volume(&self, name_or_id: &str) -> Result<VolumeInfo, CoreError> {
        let conn = self.db();
        let mut v = conn.query_row(
            &format!("{VOLUME_SELECT} WHERE id = ?1 OR (name = ?1 AND state != 'deleted') ORDER BY state = 'deleted' LIMIT 1"),
            [name_or_id],
            volume_row,
        )
        .optional()?
        .ok_or_else(|| CoreError::NotFound(format!("no volume named or with id {name_or_id:?}: see `guestkeyctl volume list`")))?;
        drop(conn);
        self.attach_progress(&mut v);
        Ok(v)
    }

    /// Adds the host's fresh progress report to a volume with a pending
    /// operation.
    fn attach_progress(&self, v: &mut VolumeInfo) {
        if matches!(v.state.as_str(), "ready" | "deleted" | "decrypted") {
            return;
        }
        let map = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        v.progress = map
            .get(&v.id)
            .filter(|p| p.host == v.host && p.at.is_some_and(|t| t.elapsed() < PROGRESS_STALE))
            .cloned();
    }

    /// Records a host's progress report: replaces what it reported before.
    /// Only volumes assigned to it count.
    pub fn record_progress(
        &self,
        host: &str,
        running: Vec<(String, String, u64, u64)>,
    ) -> Result<(), CoreError> {
        let mine: Vec<(String, String, u64, u64)> = {
            let conn = self.db();
            let mut out = vec![];
            for r in running.into_iter().take(4096) {
                let owner: Option<String> = conn
                    .query_row("SELECT host FROM volumes WHERE id = ?1", [&r.0], |x| {
                        x.get(0)
                    })
                    .optional()?;
                if owner.as_deref() == Some(host) {
                    out.push(r);
                }
            }
            out
        };
        let now = std::time::Instant::now();
        let mut map = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, p| p.host != host);
        for (id, phase, done, total) in mine {
            map.insert(
                id,
                Progress {
                    phase: phase.chars().take(64).collect(),
                    done_bytes: done,
                    total_bytes: total,
                    host: host.to_owned(),
                    at: Some(now),
                },
            );
        }
        Ok(())
    }

    /// Crypto-shredding: queues deletion on the host; the server's key is
    /// destroyed once the host confirms.
    pub fn delete_volume(
        &self,
        caller: &Caller,
        name_or_id: &str,
    ) -> Result<VolumeInfo, CoreError> {
        let v = self.get_volume(name_or_id)?;
        if v.state == "migrating" {
            return Err(CoreError::FailedPrecondition(format!(
                "volume {} is migrating with its guest: delete it when the migration is done",
                v.name
            )));
        }
        if v.state == "deleted" || v.state == "pending-delete" {
            return Err(CoreError::FailedPrecondition(format!(
                "volume {} is already {}",
                v.name, v.state
            )));
        }
        let mut conn = self.db();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let host_state: String =
            tx.query_row("SELECT state FROM hosts WHERE name = ?1", [&v.host], |r| {
                r.get(0)
            })?;
        if host_state == "revoked" {
            // Nothing more goes to a revoked host, so the image cannot be
            // removed there: crypto-shredding. Every key generation is
            // destroyed now, and the volume says where its image stays.
            audit::append(
                &tx,
                &caller.actor(),
                "volume.delete-requested",
                &v.id,
                &format!("volume {} (host {} is revoked)", v.name, v.host),
            )?;
            retire(
                &tx,
                &v,
                "deleted",
                &format!(
                    "host {} is revoked: its image was left there, unreadable without the destroyed key",
                    v.host
                ),
                &format!("crypto-shredded (host {} is revoked)", v.host),
            )?;
            tx.commit()?;
            drop(conn);
            return self.get_volume(&v.id);
        }
        tx.execute(
            "UPDATE volumes SET state = 'pending-delete', attempts = 0, next_attempt = 0, last_error = '' WHERE id = ?1",
            [&v.id],
        )?;
        audit::append(
            &tx,
            &caller.actor(),
            "volume.delete-requested",
            &v.id,
            &format!("volume {}", v.name),
        )?;
        tx.commit()?;
        drop(conn);
        self.push_wake.notify_one();
        self.get_volume(&v.id)
    }

    /// Turns a volume back into cleartext (the admin confirmed) and then
    /// destroys its key; refused while a guest uses it.
    pub fn decrypt_volume(
        &self,
        caller: &Caller,
        name_or_id: &str,
        confirm: bool,
    ) -> Result<VolumeInfo, CoreError> {
        let v = self.get_volume(name_or_id)?;
        if !confirm {
            return Err(InvalidInput {
                what: "confirmation",
                value: "missing".into(),
                why: format!(
                    "decrypting {} stores its data in clear for good: pass --yes-i-know",
                    v.name
                ),
            }
            .into());
        }
        if v.state != "ready" {
            return Err(CoreError::FailedPrecondition(format!(
                "volume {} is {}: decryption needs it ready",
                v.name, v.state
            )));
        }
        let mut conn = self.db();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // Decryption hands the key to the volume's host: not a revoked one.
        self.enrolled_host_in(&tx, &v.host)?;
        let users: Vec<String> = {
            let mut stmt = tx.prepare(
                "SELECT g.name FROM guest_disks d JOIN guests g ON g.uuid = d.guest_uuid
                 WHERE d.volume_id = ?1 AND g.state != 'undefined' ORDER BY g.name",
            )?;
            let rows = stmt.query_map([&v.id], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        if !users.is_empty() {
            return Err(CoreError::FailedPrecondition(format!(
                "volume {} is used by guest(s) {}: undefine them first (`guestkeyctl guest undefine`)",
                v.name,
                users.join(", ")
            )));
        }
        tx.execute(
            "UPDATE volumes SET state = 'pending-decrypt', attempts = 0, next_attempt = 0, last_error = '' WHERE id = ?1",
            [&v.id],
        )?;
        audit::append(
            &tx,
            &caller.actor(),
            "volume.decrypt-requested",
            &v.id,
            &format!(
                "volume {} on host {}: data to be stored in clear",
                v.name, v.host
            ),
        )?;
        tx.commit()?;
        drop(conn);
        self.push_wake.notify_one();
        self.get_volume(&v.id)
    }

    /// The host refused to encrypt a volume (nothing changed there): the
    /// record and its key go, and the name is free again.
    pub fn encrypt_refused(&self, v: &VolumeInfo, error: &str) -> Result<(), CoreError> {
        let mut conn = self.db();
        let tx = conn.transaction()?;
        audit::append(
            &tx,
            "server",
            "volume.encrypt-failed",
            &v.id,
            &format!("volume {} on host {}: {error}", v.name, v.host),
        )?;
        retire(&tx, v, "deleted", error, "was not encrypted")?;
        tx.commit()?;
        Ok(())
    }

    /// The outcome of an encryption is unknown (host unreachable): the
    /// pusher retries it (the host's step is repeatable).
    pub fn encrypt_retry_later(&self, v: &VolumeInfo, error: &str) -> Result<(), CoreError> {
        self.db().execute(
            "UPDATE volumes SET state = 'pending-encrypt', last_error = ?1, attempts = 1, next_attempt = ?2 WHERE id = ?3",
            params![error, now_unix_ms() + self.retry_delay_ms(0) as i64, v.id],
        )?;
        self.push_wake.notify_one();
        Ok(())
    }

    /// Volumes whose pending operation is due.
    pub fn due_volumes(&self, limit: u32) -> Result<Vec<VolumeInfo>, CoreError> {
        let conn = self.db();
        let mut stmt = conn.prepare(&format!(
            "{VOLUME_SELECT} WHERE state IN ('pending-create', 'pending-encrypt', 'pending-decrypt', 'pending-delete', 'rekeying') AND next_attempt <= ?1
             ORDER BY next_attempt LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![now_unix_ms(), limit], volume_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Prepares the pushes of pending volumes, in one transaction. For a
    /// creation this releases the key: its audit record is written first in
    /// the transaction, and if the transaction cannot commit no sealed key
    /// leaves this function (fail closed). Each volume gets its own outcome.
    pub fn prepare_pushes(
        &self,
        volumes: &[VolumeInfo],
    ) -> Result<Vec<Result<PushOp, String>>, CoreError> {
        let mut out = Vec::with_capacity(volumes.len());
        let mut conn = self.db();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for volume in volumes {
            out.push(self.prepare_one(&tx, volume).map_err(|e| e.to_string()));
        }
        tx.commit()?;
        Ok(out)
    }

    fn prepare_one(
        &self,
        tx: &rusqlite::Transaction<'_>,
        volume: &VolumeInfo,
    ) -> Result<PushOp, CoreError> {
        let host = self.enrolled_host_in(tx, &volume.host)?;
        if volume.state == "pending-delete" {
            return Ok(PushOp::Delete {
                volume: volume.clone(),
                host,
            });
        }
        if volume.state == "rekeying" {
            self.take_release_slot(&host.name)?;
            self.take_release_slot(&host.name)?;
            let old = self.release_packet(
                tx,
                &volume.id,
                &volume.format,
                volume.key_generation,
                &host,
                " for a rekey",
            )?;
            let new = self.release_packet(
                tx,
                &volume.id,
                &volume.format,
                volume.key_generation + 1,
                &host,
                " for a rekey",
            )?;
            let (kind, placement, bandwidth): (String, String, i64) = tx.query_row(
                "SELECT rekey_kind, rekey_placement, rekey_bandwidth FROM volumes WHERE id = ?1",
                [&volume.id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?;
            return Ok(PushOp::Rekey {
                volume: volume.clone(),
                host,
                old: Box::new(old),
                new: Box::new(new),
                deep: kind == "deep",
                placement,
                bandwidth: bandwidth.max(0) as u64,
            });
        }
        self.take_release_slot(&host.name)?;
        let why = match volume.state.as_str() {
            "pending-decrypt" => " to decrypt the volume",
            "pending-encrypt" | "encrypting" => " to encrypt the existing volume",
            _ => "",
        };
        let packet = self.release_packet(
            tx,
            &volume.id,
            &volume.format,
            volume.key_generation,
            &host,
            why,
        )?;
        if volume.state == "pending-decrypt" {
            return Ok(PushOp::Decrypt {
                volume: volume.clone(),
                host,
                packet,
            });
        }
        Ok(PushOp::Create {
            volume: volume.clone(),
            host,
            packet,
            encrypt_existing: matches!(volume.state.as_str(), "pending-encrypt" | "encrypting"),
        })
    }

    /// Releases one generation of a volume's key for `host`: audit record
    /// first, in the caller's transaction, then unwrap.
    pub(crate) fn release_packet(
        &self,
        tx: &rusqlite::Transaction<'_>,
        id: &str,
        format: &str,
        generation: u64,
        host: &EnrolledHost,
        why: &str,
    ) -> Result<KeyPacket, CoreError> {
        let (mk_id, wrapped): (String, Vec<u8>) = tx.query_row(
            "SELECT master_key_id, wrapped FROM volume_keys WHERE volume_id = ?1 AND generation = ?2",
            params![id, generation as i64],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        audit::append(
            tx,
            "server",
            "key.released",
            id,
            &format!("generation {generation} sealed to host {}{why}", host.name),
        )?;
        let key = self
            .master_for(tx)?
            .unwrap_key(id, generation, &mk_id, &wrapped)
            .map_err(|e| CoreError::Internal(e.to_string()))?;
        let uuid = uuid::Uuid::parse_str(id).map_err(|e| CoreError::Internal(e.to_string()))?;
        Ok(KeyPacket::passphrase(
            VolumeId(uuid),
            generation,
            CipherParams::aes_xts(parse_format(format)?),
            key,
        ))
    }

    /// Starts a rotation of a volume's key: makes the next generation (the
    /// server then holds two, old and new) and queues the rekey on the host.
    /// The old generation is destroyed only after the host confirms that the
    /// new one opens the volume.
    pub fn request_rekey(
        &self,
        caller: &Caller,
        name_or_id: &str,
        deep: bool,
        placement: &str,
        bandwidth: u64,
    ) -> Result<VolumeInfo, CoreError> {
        if bandwidth > 0 && !(1 << 20..=1 << 40).contains(&bandwidth) {
            return Err(InvalidInput {
                what: "bandwidth",
                value: bandwidth.to_string(),
                why: "give from 1M to 1T bytes per second, or 0 for no limit".into(),
            }
            .into());
        }
        if !matches!(placement, "" | "online" | "offline") {
            return Err(InvalidInput {
                what: "placement",
                value: placement.to_owned(),
                why: "use online, offline, or nothing (online if the guest runs)".into(),
            }
            .into());
        }
        let v = self.get_volume(name_or_id)?;
        if v.state != "ready" {
            return Err(CoreError::FailedPrecondition(format!(
                "volume {} is {}: a rekey needs it ready",
                v.name, v.state
            )));
        }
        let key = generate_passphrase()
            .map_err(|_| CoreError::Internal("the OS random number generator failed".into()))?;
        let next = v.key_generation + 1;
        let mut conn = self.db();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // The new key is for the volume's host: a revoked host gets none.
        self.enrolled_host_in(&tx, &v.host)?;
        let master = self.master_for(&tx)?;
        let wrapped = master.wrap(&v.id, next, &key);
        drop(key);
        tx.execute(
            "INSERT INTO volume_keys (volume_id, generation, master_key_id, wrapped, created) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![v.id, next as i64, master.id(), wrapped, now_unix()],
        )?;
        drop(master);
        tx.execute(
            "UPDATE volumes SET state = 'rekeying', rekey_kind = ?1, rekey_placement = ?2, rekey_bandwidth = ?3, attempts = 0, next_attempt = 0, last_error = '' WHERE id = ?4",
            params![if deep { "deep" } else { "shallow" }, placement, bandwidth as i64, v.id],
        )?;
        audit::append(
            &tx,
            &caller.actor(),
            "key.created",
            &v.id,
            &format!("volume {} generation {next}", v.name),
        )?;
        audit::append(
            &tx,
            &caller.actor(),
            "volume.rekey-requested",
            &v.id,
            &format!(
                "volume {} {}, generation {} -> {next}",
                v.name,
                if deep { "deep" } else { "shallow" },
                v.key_generation
            ),
        )?;
        tx.commit()?;
        drop(conn);
        self.push_wake.notify_one();
        self.get_volume(&v.id)
    }

    pub(crate) fn take_release_slot(&self, host: &str) -> Result<(), CoreError> {
        let now = now_unix();
        let mut map = self.releases.lock().unwrap_or_else(|p| p.into_inner());
        let slot = map.entry(host.to_owned()).or_insert((now, 0));
        if now - slot.0 >= 60 {
            *slot = (now, 0);
        }
        if slot.1 >= self.config.limits.key_releases_per_minute {
            return Err(CoreError::Exhausted(format!(
                "key release rate limit for host {host} reached ({} per minute, limits.key_releases_per_minute)",
                self.config.limits.key_releases_per_minute
            )));
        }
        slot.1 += 1;
        Ok(())
    }

    /// Records the outcomes of pushes, in one transaction: on success the
    /// path where the host keeps the volume, on failure the error (retried
    /// with exponential backoff).
    pub fn record_pushes(&self, outcomes: &[(VolumeInfo, PushOutcome)]) -> Result<(), CoreError> {
        let mut conn = self.db();
        let tx = conn.transaction()?;
        for (volume, outcome) in outcomes {
            match outcome {
                Ok(_) if volume.state == "pending-delete" => {
                    let why = format!("deleted on host {}", volume.host);
                    retire(&tx, volume, "deleted", "", &why)?;
                }
                Ok(_) if volume.state == "rekeying" => {
                    let old = volume.key_generation;
                    tx.execute(
                        "UPDATE volumes SET state = 'ready', last_error = '', generation = ?1,
                         rekey_due = CASE WHEN rekey_kind = 'deep' THEN 0 ELSE rekey_due END WHERE id = ?2",
                        params![(old + 1) as i64, volume.id],
                    )?;
                    tx.execute(
                        "DELETE FROM volume_keys WHERE volume_id = ?1 AND generation = ?2",
                        params![volume.id, old as i64],
                    )?;
                    audit::append(
                        &tx,
                        "server",
                        "key.rotated",
                        &volume.id,
                        &format!("volume {} generation {old} -> {}", volume.name, old + 1),
                    )?;
                    audit::append(
                        &tx,
                        "server",
                        "key.destroyed",
                        &volume.id,
                        &format!("volume {} generation {old}", volume.name),
                    )?;
                }
                Ok(_) if volume.state == "pending-decrypt" => {
                    audit::append(
                        &tx,
                        "server",
                        "volume.decrypted",
                        &volume.id,
                        &format!(
                            "volume {} on host {} is cleartext now",
                            volume.name, volume.host
                        ),
                    )?;
                    retire(&tx, volume, "decrypted", "", "decrypted")?;
                }
                Ok((path, capacity))
                    if matches!(volume.state.as_str(), "pending-encrypt" | "encrypting") =>
                {
                    tx.execute(
                        "UPDATE volumes SET state = 'ready', last_error = '', path = ?1, capacity = ?2 WHERE id = ?3",
                        params![path, (*capacity).max(1) as i64, volume.id],
                    )?;
                    audit::append(
                        &tx,
                        "server",
                        "volume.encrypted",
                        &volume.id,
                        &format!(
                            "volume {} on host {} encrypted from cleartext",
                            volume.name, volume.host
                        ),
                    )?;
                    let guests = crate::guests::adopt_volume(&tx, volume, path)?;
                    for g in guests {
                        audit::append(
                            &tx,
                            "server",
                            "guest.define-requested",
                            &g,
                            &format!("its disk on volume {} is encrypted now", volume.name),
                        )?;
                    }
                }
                Ok((path, _)) => {
                    tx.execute(
                        "UPDATE volumes SET state = 'ready', last_error = '', path = ?1 WHERE id = ?2",
                        params![path, volume.id],
                    )?;
                    audit::append(
                        &tx,
                        "server",
                        "key.pushed",
                        &volume.id,
                        &format!("volume {} created on host {}", volume.name, volume.host),
                    )?;
                }
                Err(e) if e.refused && volume.state == "rekeying" => {
                    // The new generation goes; the old one stays active.
                    tx.execute(
                        "DELETE FROM volume_keys WHERE volume_id = ?1 AND generation = ?2",
                        params![volume.id, (volume.key_generation + 1) as i64],
                    )?;
                    tx.execute(
                        "UPDATE volumes SET state = 'ready', last_error = ?1, rekey_kind = '', rekey_placement = '' WHERE id = ?2",
                        params![e.message, volume.id],
                    )?;
                    audit::append(
                        &tx,
                        "server",
                        "volume.rekey-refused",
                        &volume.id,
                        &format!("volume {}: {}", volume.name, e.message),
                    )?;
                    audit::append(
                        &tx,
                        "server",
                        "key.destroyed",
                        &volume.id,
                        &format!(
                            "volume {} unused generation {}",
                            volume.name,
                            volume.key_generation + 1
                        ),
                    )?;
                }
                Err(e) => {
                    let error = &e.message;
                    let delay = self.retry_delay_ms(volume.attempts);
                    tx.execute(
                        "UPDATE volumes SET attempts = attempts + 1, last_error = ?1, next_attempt = ?2 WHERE id = ?3",
                        params![error, now_unix_ms() + delay as i64, volume.id],
                    )?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Delay before the next attempt after `attempts` failures: doubling
    /// from `retry.initial_delay_ms` up to `retry.max_delay_ms`.
    pub(crate) fn retry_delay_ms(&self, attempts: u32) -> u64 {
        let r = &self.config.retry;
        r.initial_delay_ms
            .saturating_mul(1u64 << attempts.min(20))
            .min(r.max_delay_ms)
    }
}

/// A volume leaves guestkey's care (`state` deleted or decrypted): every
/// key generation of it is destroyed, with its audit record.
fn retire(
    tx: &rusqlite::Transaction<'_>,
    v: &VolumeInfo,
    state: &str,
    last_error: &str,
    why: &str,
) -> Result<(), CoreError> {
    tx.execute("DELETE FROM volume_keys WHERE volume_id = ?1", [&v.id])?;
    tx.execute(
        "UPDATE volumes SET state = ?1, last_error = ?2 WHERE id = ?3",
        params![state, last_error, v.id],
    )?;
    audit::append(
        tx,
        "server",
        "key.destroyed",
        &v.id,
        &format!("volume {} {why}", v.name),
    )?;
    Ok(())
}

pub(crate) fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
