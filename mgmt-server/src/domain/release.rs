//! Key release: the only way a volume key leaves the store.
//!
//! A release writes its `key.released` audit record first, inside the
//! caller's transaction, and only then unwraps the key: if the record
//! cannot be written, the transaction fails and no key leaves (fail
//! closed); if the transaction cannot commit, the caller drops the packet
//! unsent. Packets are sealed to the receiving host's key (HPKE) before
//! they go on the wire. A per-host rate limit bounds how many keys a host
//! receives per minute.

use std::collections::HashMap;
use std::sync::Mutex;

use xdr_wipe::packet::{CipherParams, KeyPacket, Mechanism, VolumeId};
use xdr_wipe::seal::seal;

use crate::domain::agent::SealedKey;
use crate::domain::{Core, now_unix};
use crate::model::{CoreError, EnrolledHost, VolumeFormat};
use crate::store::Tx;

/// Key releases per host and minute.
pub(crate) struct ReleaseLimiter {
    per_minute: u32,
    /// Per host: start of its current minute, releases in it.
    slots: Mutex<HashMap<String, (i64, u32)>>,
}

impl ReleaseLimiter {
    pub(crate) fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// Takes `n` releases for `host`, or says that its limit is reached.
    pub(crate) fn take(&self, host: &str, n: u32) -> Result<(), CoreError> {
        let now = now_unix();
        let mut map = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let slot = map.entry(host.to_owned()).or_insert((now, 0));
        if now - slot.0 >= 60 {
            *slot = (now, 0);
        }
        for _ in 0..n {
            if slot.1 >= self.per_minute {
                return Err(CoreError::Exhausted(format!(
                    "key release rate limit for host {host} reached ({} per minute, limits.key_releases_per_minute)",
                    self.per_minute
                )));
            }
            slot.1 += 1;
        }
        Ok(())
    }
}

impl Core {
    /// Releases one generation of a volume's key for `host`: audit record
    /// first, in the caller's transaction, then unwrap. `why` completes the
    /// record's detail (e.g. " for a rekey"). For a volume whose policy
    /// needs attestation, the host's last attestation must have passed and
    /// be fresh.
    pub(crate) fn release(
        &self,
        tx: &mut dyn Tx,
        volume_id: &str,
        format: VolumeFormat,
        generation: u64,
        host: &EnrolledHost,
        why: &str,
    ) -> Result<KeyPacket, CoreError> {
        // The gate first, with the volume's policy as it is now (not as a
        // caller read it before its round trips): nothing is read or
        // logged as released for a host that fails it.
        let (policy, split, wrapped) = tx
            .release_material(volume_id, generation)?
            .ok_or_else(|| CoreError::Internal(format!("volume {volume_id} vanished")))?;
        if policy.needs_attestation() {
            self.require_attested(tx, &host.name)?;
        }
        let wrapped = wrapped.ok_or_else(|| {
            CoreError::Internal(format!(
                "volume {volume_id} has no key of generation {generation}"
            ))
        })?;
        self.log(
            tx,
            "server",
            "key.released",
            volume_id,
            &format!("generation {generation} sealed to host {}{why}", host.name),
        )?;
        let key = self
            .keys
            .current(tx)?
            .unwrap_key(
                volume_id,
                generation,
                &wrapped.master_key_id,
                &wrapped.wrapped,
            )
            .map_err(|e| CoreError::Internal(e.to_string()))?;
        let uuid =
            uuid::Uuid::parse_str(volume_id).map_err(|e| CoreError::Internal(e.to_string()))?;
        let mut packet = KeyPacket::passphrase(
            VolumeId(uuid),
            generation,
            CipherParams::aes_xts(format.packet()),
            key,
        );
        if split {
            // Our half: the host combines it with the verifier's.
            packet.mechanism = Mechanism::QemuLuksPassphraseHalf;
        }
        self.counters.release(&host.name);
        Ok(packet)
    }

    /// Takes `n` key releases of `host`'s per-minute budget.
    pub(crate) fn take_releases(&self, host: &str, n: u32) -> Result<(), CoreError> {
        self.releases.take(host, n)
    }
}

/// Seals `packet` to `host`: the bytes carry no clear key.
pub(crate) fn seal_for(packet: &KeyPacket, host: &EnrolledHost) -> Result<SealedKey, String> {
    let host_id = xdr_wipe::XdrString::new(host.name.clone()).map_err(|e| e.to_string())?;
    let sealed = seal(packet, &host_id, &host.sealing_key)
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(SealedKey {
        volume_id: packet.volume_id.0.to_string(),
        generation: packet.generation,
        sealed,
    })
}
