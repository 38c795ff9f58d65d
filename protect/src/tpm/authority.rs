//! The PCR authority: the key whose signature makes a PCR policy acceptable
//! to a sealed key (TPM2_PolicyAuthorize), and the approvals it signs.
//!
//! A sealed key does not name PCR values; it names this key. Whoever holds
//! the authority's private key approves the PCR values of a new firmware,
//! bootloader or kernel in advance, with one command, and the machine
//! unseals after the update's reboot without being enrolled again. The
//! private key must not live on the machine it approves for (whoever reads
//! that disk from another boot could approve their own PCR values): for the
//! server it is a file the operator keeps elsewhere; for hosts it is kept by
//! the management server.
//!
//! The key is ECDSA P-256 (ring); the TPM checks the signature itself
//! (TPM2_VerifySignature), so nothing here verifies in software.

use std::path::Path;

use crate::{Encoding, FileProtector, KeyProtector, ProtectedKey};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde::{Deserialize, Serialize};

use crate::tpm::TpmError;
use crate::tpm::pcr::{PcrValues, approval_digest};

/// The policy reference every guestkey sealed object and approval uses:
/// an approval signed for guestkey is not an approval for anything else the
/// same key might sign.
pub const POLICY_REF: &[u8] = b"guestkey PCR approval v1";

/// The public half of an authority: an uncompressed P-256 point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorityPublic {
    /// X coordinate, 32 bytes (hex in files).
    #[serde(with = "hex::serde")]
    pub x: Vec<u8>,
    /// Y coordinate, 32 bytes (hex in files).
    #[serde(with = "hex::serde")]
    pub y: Vec<u8>,
}

impl AuthorityPublic {
    /// A short fingerprint for operators: the first 8 bytes of SHA-256 over
    /// the point, hex.
    pub fn fingerprint(&self) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update([4u8]);
        h.update(&self.x);
        h.update(&self.y);
        hex::encode(&h.finalize()[..8])
    }
}

/// The private authority key (PKCS#8 in a file of mode 0600).
pub struct Authority {
    pair: EcdsaKeyPair,
}

impl Authority {
    /// A new authority key, written to `path` (refused if a file is there).
    pub fn create(path: &Path) -> Result<Self, TpmError> {
        // Made with p256, whose encoding is wiped (ring's generated
        // document is not).
        let der = crate::tpm::entropy::p256_pkcs8_from(|| {
            ProtectedKey::random(32)
                .map_err(|e| TpmError::Io(format!("the OS random generator failed: {e}")))
        })?;
        let key = ProtectedKey::copy_from_secret_slice(&der);
        FileProtector::new(path, Encoding::Raw).create(&key)?;
        Self::from_pkcs8(&key, path)
    }

    /// The authority key in `path`.
    pub fn open(path: &Path) -> Result<Self, TpmError> {
        let key = FileProtector::new(path, Encoding::Raw).unseal()?;
        Self::from_pkcs8(&key, path)
    }

    fn from_pkcs8(key: &ProtectedKey, path: &Path) -> Result<Self, TpmError> {
        let pair = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            key.expose_secret(),
            &SystemRandom::new(),
        )
        .map_err(|_| {
            TpmError::Authority(format!(
                "{} is not a PCR authority key (a P-256 PKCS#8 key made by guestkey)",
                path.display()
            ))
        })?;
        Ok(Self { pair })
    }

    /// Its public half.
    pub fn public(&self) -> AuthorityPublic {
        let p = self.pair.public_key().as_ref();
        AuthorityPublic {
            x: p[1..33].to_vec(),
            y: p[33..65].to_vec(),
        }
    }

    /// Signs the PCR policy of `values`: a sealed key of this authority then
    /// unseals on a machine whose PCRs have exactly these values.
    pub fn approve(&self, values: PcrValues, note: &str) -> Result<Approval, TpmError> {
        let policy = values.policy_digest().map_err(TpmError::Authority)?;
        // ring signs SHA-256(message) and the TPM checks a signature over
        // aHash = SHA-256(approvedPolicy ‖ policyRef): the same digest.
        let mut message = policy.to_vec();
        message.extend_from_slice(POLICY_REF);
        let sig = self
            .pair
            .sign(&SystemRandom::new(), &message)
            .map_err(|_| TpmError::Authority("signing failed".into()))?;
        let sig = sig.as_ref();
        debug_assert_eq!(
            ring::digest::digest(&ring::digest::SHA256, &message).as_ref(),
            approval_digest(&policy, POLICY_REF)
        );
        Ok(Approval {
            authority: self.public().fingerprint(),
            values,
            note: note.to_owned(),
            r: sig[..32].to_vec(),
            s: sig[32..].to_vec(),
        })
    }
}

/// One signed PCR policy: "a machine with these PCR values may unseal the
/// keys of this authority". Not secret; kept next to the sealed keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// Fingerprint of the authority that signed it.
    pub authority: String,
    /// The PCR values approved.
    pub values: PcrValues,
    /// What the operator said it is for (e.g. "kernel 6.1.0-30").
    #[serde(default)]
    pub note: String,
    /// ECDSA signature, r.
    #[serde(with = "hex::serde")]
    pub r: Vec<u8>,
    /// ECDSA signature, s.
    #[serde(with = "hex::serde")]
    pub s: Vec<u8>,
}

/// The approvals kept for a machine's sealed keys (a JSON file).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approvals {
    /// Newest last.
    pub approvals: Vec<Approval>,
}

/// At most this many approvals are kept: the oldest go first.
pub const MAX_APPROVALS: usize = 32;

impl Approvals {
    /// The approvals in `path`; none when the file is not there.
    pub fn load(path: &Path) -> Result<Self, TpmError> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                TpmError::Corrupt(format!(
                    "{} is not a list of PCR approvals: {e}",
                    path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(TpmError::Io(format!("cannot read {}: {e}", path.display()))),
        }
    }

    /// Adds `a` (replacing an approval of the same values) and writes the
    /// file atomically.
    pub fn add_and_save(path: &Path, a: Approval) -> Result<Self, TpmError> {
        let mut all = Self::load(path)?;
        all.approvals
            .retain(|old| !(old.values == a.values && old.authority == a.authority));
        all.approvals.push(a);
        let excess = all.approvals.len().saturating_sub(MAX_APPROVALS);
        all.approvals.drain(..excess);
        all.save(path)?;
        Ok(all)
    }

    /// Writes the file atomically (temporary file, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<(), TpmError> {
        let text = serde_json::to_vec_pretty(self).expect("approvals serialize");
        crate::tpm::files::write_atomic(path, &text)
    }
}
