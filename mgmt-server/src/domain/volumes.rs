//! Volumes and their keys: "encrypt this volume", look-ups, decryption,
//! and deletion (crypto-shredding). The pushes themselves are
//! [`super::push`]; rekeys are [`super::rekey`].

use crate::domain::hosts::enrolled_in;
use crate::domain::{Core, now_unix, now_unix_ms};
use crate::model::names::MAX_CAPACITY;
use crate::model::{
    Caller, CoreError, HostState, InvalidInput, Name, ReleasePolicy, VolumeFormat, VolumeInfo,
    VolumeState,
};
use crate::store::{NewVolume, Tx, WrappedKey};

/// A report older than this is stale (the host reports every second).
const PROGRESS_STALE: std::time::Duration = std::time::Duration::from_secs(5);

pub(crate) fn no_such_volume(name_or_id: &str) -> CoreError {
    CoreError::NotFound(format!(
        "no volume named or with id {name_or_id:?}: see `guestkeyctl volume list`"
    ))
}

/// A volume by name (live volumes) or UUID (any), inside a transaction.
pub(crate) fn find_in(tx: &mut dyn Tx, name_or_id: &str) -> Result<VolumeInfo, CoreError> {
    tx.find_volume(name_or_id)?
        .ok_or_else(|| no_such_volume(name_or_id))
}

impl Core {
    /// A volume leaves guestkey's care (`state` deleted or decrypted): every
    /// key generation of it is destroyed, with its audit record.
    pub(crate) fn retire(
        &self,
        tx: &mut dyn Tx,
        v: &VolumeInfo,
        state: VolumeState,
        last_error: &str,
        why: &str,
    ) -> Result<(), CoreError> {
        tx.delete_volume_keys(&v.id)?;
        tx.set_volume_state_error(&v.id, state, last_error)?;
        self.log(
            tx,
            "server",
            "key.destroyed",
            &v.id,
            &format!("volume {} {why}", v.name),
        )?;
        Ok(())
    }

    /// "Encrypt this volume": makes its key and queues its creation on the host.
    pub fn create_volume(
        &self,
        caller: &Caller,
        host: &str,
        pool: &str,
        name: &str,
        capacity_bytes: u64,
        format: VolumeFormat,
    ) -> Result<VolumeInfo, CoreError> {
        self.new_volume(
            caller,
            host,
            pool,
            name,
            Some(capacity_bytes),
            format,
            ReleasePolicy::Auto,
            false,
        )
    }

    /// As [`Core::create_volume`], with what a release of its key needs,
    /// and whether the key is split (this server keeps one half of the
    /// passphrase, the verifier the host enrolled with the other; only with
    /// a policy that attests, since each half goes only to an attested host).
    #[allow(clippy::too_many_arguments)]
    pub fn create_volume_with(
        &self,
        caller: &Caller,
        host: &str,
        pool: &str,
        name: &str,
        capacity_bytes: u64,
        format: VolumeFormat,
        release: ReleasePolicy,
        split: bool,
    ) -> Result<VolumeInfo, CoreError> {
        if split && !release.needs_attestation() {
            return Err(InvalidInput {
                what: "release policy",
                value: release.to_string(),
                why: "each half of a split key goes only to an attested host: use --release attested or attested+approved with --split".into(),
            }
            .into());
        }
        self.new_volume(
            caller,
            host,
            pool,
            name,
            Some(capacity_bytes),
            format,
            release,
            split,
        )
    }

    /// Sets what a release of the volume's key needs; audited. `attested`
    /// only for a volume whose host has a pinned attestation key.
    pub fn set_release_policy(
        &self,
        caller: &Caller,
        name_or_id: &str,
        release: ReleasePolicy,
    ) -> Result<VolumeInfo, CoreError> {
        self.write(|tx| {
            let v = find_in(tx, name_or_id)?;
            if v.release == release {
                return Ok(v);
            }
            // Whether the host keeps a guest's key at rest was settled when
            // the guest was defined there.
            let users = tx.volume_users(&v.id)?;
            if !users.is_empty() {
                return Err(CoreError::FailedPrecondition(format!(
                    "volume {} is used by guest(s) {}: its release policy changes only while no guest uses it (whether a host keeps the key was settled at the guest's definition); undefine them, set the policy, define them again",
                    v.name,
                    users.join(", ")
                )));
            }
            if v.split && !release.needs_attestation() {
                return Err(CoreError::FailedPrecondition(format!(
                    "volume {} has a split key, whose halves go only to an attested host: its release policy stays attested or attested+approved",
                    v.name
                )));
            }
            if release.needs_attestation() {
                attestable(tx, &v.host)?;
            }
            tx.set_release_policy(&v.id, release)?;
            self.log(
                tx,
                &caller.actor(),
                "volume.release-policy",
                &v.id,
                &format!("volume {}: release {} (was {})", v.name, release, v.release),
            )?;
            find_in(tx, &v.id)
        })
    }

    /// Records the existing cleartext volume `name` of `pool` on `host` as
    /// coming under guestkey and makes its key; the admin's call then pushes
    /// the encryption itself ([`super::convert`]). Its size is known once the
    /// host reports it.
    pub fn record_encryption(
        &self,
        caller: &Caller,
        host: &str,
        pool: &str,
        name: &str,
        format: VolumeFormat,
    ) -> Result<VolumeInfo, CoreError> {
        self.new_volume(
            caller,
            host,
            pool,
            name,
            None,
            format,
            ReleasePolicy::Auto,
            false,
        )
    }

    /// A new volume record and key: created empty with `capacity`, or
    /// encrypted from the existing cleartext volume when `capacity` is None.
    #[allow(clippy::too_many_arguments)]
    fn new_volume(
        &self,
        caller: &Caller,
        host: &str,
        pool: &str,
        name: &str,
        capacity: Option<u64>,
        format: VolumeFormat,
        release: ReleasePolicy,
        split: bool,
    ) -> Result<VolumeInfo, CoreError> {
        let host = Name::parse("host name", host)?;
        let pool = Name::parse("pool name", pool)?;
        let name = Name::parse("volume name", name)?;
        let (capacity_bytes, state, what) = match capacity {
            Some(c) => (c, VolumeState::PendingCreate, "volume.create-requested"),
            // 1 until the host reports the real size. `encrypting`: the
            // admin's call pushes it itself, the pusher does not pick it up.
            None => (1, VolumeState::Encrypting, "volume.encrypt-requested"),
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
        let key = self.new_key(split)?;
        let v = self.write(|tx| {
            let master = self.keys.current(tx)?;
            let wrapped = WrappedKey {
                master_key_id: master.id().to_owned(),
                wrapped: master.wrap(&id, 1, &key),
            };
            drop(master);
            if tx.volume_name_taken(name.as_str())? {
                return Err(CoreError::AlreadyExists(format!(
                    "a volume named {name} already exists: volume names are unique per server"
                )));
            }
            if release.needs_attestation() {
                attestable(tx, host.as_str())?;
            }
            let count = tx.host_volume_count(host.as_str())?;
            if count >= self.limits.max_volumes_per_host {
                return Err(CoreError::Exhausted(format!(
                    "host {host} has {count} volumes, the limit (limits.max_volumes_per_host) is {}",
                    self.limits.max_volumes_per_host
                )));
            }
            let now = now_unix();
            tx.insert_volume(&NewVolume {
                id: id.clone(),
                name: name.to_string(),
                host: host.to_string(),
                pool: pool.to_string(),
                format,
                capacity: capacity_bytes,
                secret_uuid: secret_uuid.clone(),
                state,
                created: now,
                release,
                split,
            })?;
            tx.insert_volume_key(&id, 1, &wrapped, now)?;
            self.log(tx,
                &caller.actor(),
                "key.created",
                &id,
                &format!(
                    "volume {name} generation 1{}",
                    if split { " (this server's half of a split key)" } else { "" }
                ),
            )?;
            self.log(tx,
                &caller.actor(),
                what,
                &id,
                &format!("volume {name} on host {host} pool {pool}"),
            )?;
            find_in(tx, &id)
        })?;
        drop(key);
        self.wake.notify_one();
        Ok(v)
    }

    /// Volumes, optionally of one host, by name; deleted ones are left out.
    pub fn list_volumes(&self, host: Option<&str>) -> Result<Vec<VolumeInfo>, CoreError> {
        let mut vols = self.read(|tx| Ok(tx.volumes(host)?))?;
        for v in &mut vols {
            self.attach_progress(v);
        }
        Ok(vols)
    }

    /// A volume by name (live volumes) or UUID (any).
    pub fn get_volume(&self, name_or_id: &str) -> Result<VolumeInfo, CoreError> {
        let mut v = self.read(|tx| find_in(tx, name_or_id))?;
        self.attach_progress(&mut v);
        Ok(v)
    }

    /// Adds the host's fresh progress report to a volume with a pending
    /// operation.
    fn attach_progress(&self, v: &mut VolumeInfo) {
        if v.state == VolumeState::Ready || !v.state.is_live() {
            return;
        }
        let map = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        v.progress = map
            .get(&v.id)
            .filter(|p| p.host == v.host && p.at.is_some_and(|t| t.elapsed() < PROGRESS_STALE))
            .cloned();
    }

    /// Crypto-shredding: queues deletion on the host; the server's key is
    /// destroyed once the host confirms. A volume of a revoked host is
    /// shredded at once (nothing more goes to that host).
    pub fn delete_volume(
        &self,
        caller: &Caller,
        name_or_id: &str,
    ) -> Result<VolumeInfo, CoreError> {
        let v = self.get_volume(name_or_id)?;
        match v.state {
            VolumeState::Migrating => {
                return Err(CoreError::FailedPrecondition(format!(
                    "volume {} is migrating with its guest: delete it when the migration is done",
                    v.name
                )));
            }
            VolumeState::Deleted | VolumeState::PendingDelete => {
                return Err(CoreError::FailedPrecondition(format!(
                    "volume {} is already {}",
                    v.name, v.state
                )));
            }
            _ => {}
        }
        let v = self.write(|tx| {
            let revoked = tx
                .host_record(&v.host)?
                .is_some_and(|h| h.state == HostState::Revoked);
            if revoked {
                // The image cannot be removed there: every key generation
                // is destroyed now, and the volume says where its image stays.
                self.log(tx,
                    &caller.actor(),
                    "volume.delete-requested",
                    &v.id,
                    &format!("volume {} (host {} is revoked)", v.name, v.host),
                )?;
                self.retire(
                    tx,
                    &v,
                    VolumeState::Deleted,
                    &format!(
                        "host {} is revoked: its image was left there, unreadable without the destroyed key",
                        v.host
                    ),
                    &format!("crypto-shredded (host {} is revoked)", v.host),
                )?;
            } else {
                tx.queue_volume_op(&v.id, VolumeState::PendingDelete)?;
                self.log(tx,
                    &caller.actor(),
                    "volume.delete-requested",
                    &v.id,
                    &format!("volume {}", v.name),
                )?;
            }
            find_in(tx, &v.id)
        })?;
        self.wake.notify_one();
        Ok(v)
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
        if v.state != VolumeState::Ready {
            return Err(CoreError::FailedPrecondition(format!(
                "volume {} is {}: decryption needs it ready",
                v.name, v.state
            )));
        }
        let v = self.write(|tx| {
            // Decryption hands the key to the volume's host: not a revoked one.
            enrolled_in(tx, &v.host)?;
            let users = tx.volume_users(&v.id)?;
            if !users.is_empty() {
                return Err(CoreError::FailedPrecondition(format!(
                    "volume {} is used by guest(s) {}: undefine them first (`guestkeyctl guest undefine`)",
                    v.name,
                    users.join(", ")
                )));
            }
            tx.queue_volume_op(&v.id, VolumeState::PendingDecrypt)?;
            self.log(tx,
                &caller.actor(),
                "volume.decrypt-requested",
                &v.id,
                &format!(
                    "volume {} on host {}: data to be stored in clear",
                    v.name, v.host
                ),
            )?;
            find_in(tx, &v.id)
        })?;
        self.wake.notify_one();
        Ok(v)
    }

    /// The host refused to encrypt a volume (nothing changed there): the
    /// record and its key go, and the name is free again.
    pub(crate) fn encrypt_refused(&self, v: &VolumeInfo, error: &str) -> Result<(), CoreError> {
        self.write(|tx| {
            self.log(
                tx,
                "server",
                "volume.encrypt-failed",
                &v.id,
                &format!("volume {} on host {}: {error}", v.name, v.host),
            )?;
            self.retire(tx, v, VolumeState::Deleted, error, "was not encrypted")
        })
    }

    /// The outcome of an encryption is unknown (host unreachable): the
    /// pusher retries it (the host's step is repeatable).
    pub(crate) fn encrypt_retry_later(&self, v: &VolumeInfo, error: &str) -> Result<(), CoreError> {
        let next = now_unix_ms() + self.retry_delay_ms(0) as i64;
        self.write(|tx| Ok(tx.encrypt_later(&v.id, error, next)?))?;
        self.wake.notify_one();
        Ok(())
    }
}

/// Refuses `attested` for a host that cannot be attested.
pub(crate) fn attestable(tx: &mut dyn Tx, host: &str) -> Result<(), CoreError> {
    match tx.host_identity(host)? {
        Some(id) if id.pinned => Ok(()),
        Some(_) => Err(CoreError::FailedPrecondition(format!(
            "host {host}'s attestation key was never proven to live in its TPM: a volume there cannot be `attested` yet; guestkeyd tries the proof again each time it starts on that host (its log says why it failed)"
        ))),
        None => Err(CoreError::FailedPrecondition(format!(
            "host {host} was enrolled without a TPM, so it cannot be attested: a volume there cannot be `attested`; register it under a new name (`guestkeyctl host add`) and enroll that with `guestkeyd enroll --tpm` on a fresh state directory"
        ))),
    }
}
