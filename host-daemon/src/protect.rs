//! The host's keys at rest: its packet-sealing key (it opens the key
//! packets the server seals to this host) and its store key (it seals the
//! guest store), each obtained through a [`KeyProtector`] of
//! `guestkey-protect`: files in the state directory readable by root only,
//! or, for a host enrolled with `--tpm` (or resealed), sealed to this
//! host's TPM in `STATE_DIR/tpm/` ([`KEYS`], `guestkey_protect::tpm`).
//!
//! May import: [`crate::model`], [`crate::state`]. Imported by: [`crate::store`],
//! [`crate::ops`], the gRPC enrollment client, the binary.

use std::path::Path;

use guestkey_protect::tpm::attest::{AttestationKey, Endorsement, Quote};
use guestkey_protect::tpm::{DEADLINE, KeyEntry, KeySet, PcrSelection, with_tpm};
use guestkey_protect::{Encoding, FileProtector, KeyProtector, ProtectError, ProtectedKey};
use xdr_wipe::packet::{KeyPacket, VolumeId};
use xdr_wipe::seal::{HostId, HostSealingKey, OpenError, open};
use zeroize::Zeroizing;

use crate::state::StateDir;

/// Where this host's two keys are kept.
pub struct HostProtectors {
    /// The X25519 packet-sealing private key.
    pub sealing: Box<dyn KeyProtector>,
    /// The key of the sealed guest store.
    pub store: Box<dyn KeyProtector>,
}

/// The host's keys, as one set sealed and moved together.
pub const KEYS: &[KeyEntry] = &[
    KeyEntry {
        name: "sealing.key",
        file: "sealing.key",
        encoding: Encoding::Raw,
    },
    KeyEntry {
        name: "store.key",
        file: "store.key",
        encoding: Encoding::Raw,
    },
];

/// The command that approves this host's current PCR values.
pub fn approve_hint(state_dir: &Path, authority_key: &Path) -> String {
    format!(
        "guestkeyd tpm approve --state-dir {} --authority-key {} --current",
        state_dir.display(),
        authority_key.display()
    )
}

/// The key set of the state directory `root`.
pub fn keyset(root: &Path) -> KeySet {
    KeySet::new(root, KEYS, approve_hint)
}

impl HostProtectors {
    /// Where the keys of `dir` are kept: sealed to the TPM when the state
    /// directory has TPM settings, else files.
    pub fn for_dir(dir: &StateDir) -> Self {
        let set = keyset(dir.root());
        Self {
            sealing: set.protector(&KEYS[0]),
            store: set.protector(&KEYS[1]),
        }
    }

    /// Both as files in the state directory (`sealing.key`, `store.key`,
    /// raw bytes, mode 0600).
    pub fn files(dir: &StateDir) -> Self {
        Self {
            sealing: Box::new(FileProtector::new(dir.file("sealing.key"), Encoding::Raw)),
            store: Box::new(FileProtector::new(dir.file("store.key"), Encoding::Raw)),
        }
    }
}

/// This host's identity for key packets.
pub struct HostKeys {
    /// Host name as enrolled.
    pub host: HostId,
    sealing: HostSealingKey,
}

/// The host's keys could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// No enrollment, or its files cannot be read.
    #[error("{0}: is this host enrolled? run `guestkeyd enroll` first")]
    NotEnrolled(String),
    /// The protector failed.
    #[error("the packet-sealing key: {0}")]
    Protector(#[from] ProtectError),
    /// The key is not an X25519 private key.
    #[error("the packet-sealing key from {0} is not a 32-byte X25519 key")]
    BadKey(String),
}

impl HostKeys {
    /// The packet-sealing key's public part: what servers seal to.
    pub fn sealing_public(&self) -> [u8; 32] {
        *self.sealing.public_key().as_bytes()
    }

    /// Loads the host name from the state directory and the sealing key
    /// from its protector.
    pub fn load(dir: &StateDir, sealing: &dyn KeyProtector) -> Result<Self, KeysError> {
        let path = dir.file("host");
        let name = std::fs::read_to_string(&path)
            .map_err(|e| KeysError::NotEnrolled(format!("cannot read {}: {e}", path.display())))?;
        let host = HostId::new(name.trim().to_owned())
            .map_err(|e| KeysError::NotEnrolled(format!("{}: {e}", path.display())))?;
        if !sealing.exists()? {
            return Err(KeysError::NotEnrolled(format!(
                "no packet-sealing key in {}",
                sealing.describe()
            )));
        }
        let key = sealing.unseal()?;
        let sealing_key = HostSealingKey::from_secret_bytes(key.expose_secret())
            .map_err(|_| KeysError::BadKey(sealing.describe()))?;
        Ok(Self {
            host,
            sealing: sealing_key,
        })
    }

    /// The sealing key's bytes, for storing a newly made key.
    pub fn protect_new(
        sealing: &HostSealingKey,
        protector: &dyn KeyProtector,
    ) -> Result<(), ProtectError> {
        let bytes = sealing.expose_secret_bytes();
        protector.create(&ProtectedKey::copy_from_secret_slice(bytes.as_ref()))
    }

    /// Opens a sealed packet for `volume`/`generation`.
    pub fn open(
        &self,
        sealed: &[u8],
        volume: VolumeId,
        generation: u64,
    ) -> Result<KeyPacket, OpenError> {
        open(sealed, &self.sealing, &self.host, volume, generation)
    }

    /// This host's keys, made in memory (tests of the operations).
    #[cfg(test)]
    pub fn for_tests(host: &str, sealing: HostSealingKey) -> Self {
        Self {
            host: HostId::new(host.to_owned()).unwrap_or_else(|e| panic!("{e}")),
            sealing,
        }
    }
}

/// This host's attestation key, made on its TPM at `guestkeyd enroll
/// --tpm` and kept in `STATE_DIR/attestation/` (`ak.pub`, `ak.priv`: the
/// private part is encrypted by the TPM under its endorsement key, useless
/// to any other TPM; `tcti`). It signs quotes for the server's attestation
/// challenges; nothing else.
pub struct HostAttestation {
    tcti: String,
    key: AttestationKey,
}

/// The attestation folder of a state directory.
pub const ATTESTATION_DIR: &str = "attestation";

impl HostAttestation {
    /// Makes the EK's public part (and certificate) and a new AK on the
    /// TPM at `tcti`, and writes the AK into `into` (created, 0700).
    pub fn make(into: &Path, tcti: &str) -> Result<(Self, Endorsement), String> {
        let (ek, key) = with_tpm(tcti, DEADLINE, move |tpm| {
            let ek = tpm.endorsement()?;
            let key = tpm.create_attestation_key()?;
            Ok((ek, key))
        })
        .map_err(|e| e.to_string())?;
        crate::state::private_dir(into)
            .map_err(|e| format!("cannot create {}: {e}", into.display()))?;
        for (name, bytes) in [
            ("ak.pub", key.public.as_slice()),
            ("ak.priv", key.private.as_slice()),
            ("tcti", tcti.as_bytes()),
        ] {
            let p = into.join(name);
            crate::state::write_atomic(&p, bytes)
                .map_err(|e| format!("cannot write {}: {e}", p.display()))?;
        }
        Ok((
            Self {
                tcti: tcti.to_owned(),
                key,
            },
            ek,
        ))
    }

    /// The attestation key of `dir` (None: enrolled without a TPM).
    pub fn load(dir: &StateDir) -> Result<Option<Self>, String> {
        let root = dir.file(ATTESTATION_DIR);
        if !root.exists() {
            return Ok(None);
        }
        let read = |name: &str| {
            let p = root.join(name);
            std::fs::read(&p).map_err(|e| format!("cannot read {}: {e}", p.display()))
        };
        let tcti = String::from_utf8(read("tcti")?)
            .map_err(|_| format!("{}/tcti is not text", root.display()))?;
        Ok(Some(Self {
            tcti: tcti.trim().to_owned(),
            key: AttestationKey {
                public: read("ak.pub")?,
                private: read("ak.priv")?,
            },
        }))
    }

    /// The secret the server's credential protects, recovered by the TPM
    /// (only if this AK lives in the TPM of the EK it was made for).
    pub fn activate(&self, blob: &[u8], secret: &[u8]) -> Result<Zeroizing<Vec<u8>>, String> {
        let key = self.copy();
        let (blob, secret) = (blob.to_vec(), secret.to_vec());
        with_tpm(&self.tcti, DEADLINE, move |t| {
            t.activate_credential(&key, &blob, &secret)
        })
        .map_err(|e| e.to_string())
    }

    /// A quote of `pcrs` with the server's `nonce`.
    pub fn quote(&self, nonce: &[u8], pcrs: &[u8]) -> Result<Quote, String> {
        if nonce.is_empty() || nonce.len() > 64 {
            return Err(format!(
                "the nonce is {} bytes: a challenge carries 1 to 64",
                nonce.len()
            ));
        }
        let selection = PcrSelection::new(pcrs.iter().copied())?;
        let key = self.copy();
        let nonce = nonce.to_vec();
        with_tpm(&self.tcti, DEADLINE, move |t| {
            t.quote(&key, &nonce, &selection)
        })
        .map_err(|e| e.to_string())
    }

    /// The EK's public area (and certificate) of this AK's TPM, read again
    /// (for an enrollment with a verifier).
    pub fn endorsement(&self) -> Result<Endorsement, String> {
        with_tpm(&self.tcti, DEADLINE, |t| t.endorsement()).map_err(|e| e.to_string())
    }

    /// The AK's public area (`TPMT_PUBLIC`), what the server pins.
    pub fn public(&self) -> &[u8] {
        &self.key.public
    }

    fn copy(&self) -> AttestationKey {
        AttestationKey {
            public: self.key.public.clone(),
            private: self.key.private.clone(),
        }
    }
}
