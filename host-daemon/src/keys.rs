//! Opening this host's key packets.

use xdr_wipe::packet::KeyPacket;
use xdr_wipe::seal::{HostId, HostSealingKey, OpenError, open};

use crate::state::StateDir;
use crate::store::StoredKey;

/// This host's identity for key packets.
pub struct HostKeys {
    /// Host name as enrolled.
    pub host: HostId,
    sealing: HostSealingKey,
}

/// Reading the enrollment files failed.
#[derive(Debug, thiserror::Error)]
#[error("{0}: is this host enrolled? run `guestkeyd enroll` first")]
pub struct NotEnrolled(String);

impl HostKeys {
    /// Loads the host name and sealing key from the state directory.
    pub fn load(dir: &StateDir) -> Result<Self, NotEnrolled> {
        let name = std::fs::read_to_string(dir.file("host"))
            .map_err(|e| NotEnrolled(format!("cannot read {}: {e}", dir.file("host").display())))?;
        let host = HostId::new(name.trim().to_owned()).map_err(|e| NotEnrolled(e.to_string()))?;
        let bytes =
            zeroize::Zeroizing::new(std::fs::read(dir.file("sealing.key")).map_err(|e| {
                NotEnrolled(format!(
                    "cannot read {}: {e}",
                    dir.file("sealing.key").display()
                ))
            })?);
        let sealing =
            HostSealingKey::from_secret_bytes(&bytes).map_err(|e| NotEnrolled(e.to_string()))?;
        Ok(Self { host, sealing })
    }

    /// Opens a sealed packet for `volume`/`generation`.
    pub fn open(
        &self,
        sealed: &[u8],
        volume: xdr_wipe::packet::VolumeId,
        generation: u64,
    ) -> Result<KeyPacket, OpenError> {
        open(sealed, &self.sealing, &self.host, volume, generation)
    }

    /// Opens a stored key.
    pub fn open_stored(&self, k: &StoredKey) -> Result<KeyPacket, OpenError> {
        open(
            &k.sealed,
            &self.sealing,
            &self.host,
            k.volume_id,
            k.generation,
        )
    }
}
