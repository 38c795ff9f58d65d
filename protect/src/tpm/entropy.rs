//! Key generation with TPM random bytes mixed in (after Leeson): every key
//! is HKDF-SHA-256 over the operating system's random bytes, salted with
//! random bytes of the TPM, so a machine that booted with little entropy
//! cannot weaken the keys it makes, and neither can a TPM with a weak
//! generator (the OS bytes alone are as strong as before).
//!
//! [`Entropy`] is what the server and the host daemon keep: with a TPM it
//! owns one TPM connection on a thread of its own and asks it for 32 bytes
//! per key; without one, or when the TPM stops answering, keys come from
//! the OS generator alone, and that is logged once.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::ProtectedKey;
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::tpm::TpmError;
use crate::tpm::device::Tpm;
use crate::tpm::service::with_tpm;

const INFO: &[u8] = b"guestkey key generation v1: OS random, TPM random salt";

/// A key of `len` bytes: OS random bytes, mixed with 32 TPM random bytes
/// when `tpm` is given.
pub fn key_with(tpm: Option<&mut Tpm>, len: usize) -> Result<ProtectedKey, TpmError> {
    let mut os = Zeroizing::new(vec![0u8; len.max(32)]);
    getrandom::fill(&mut os)
        .map_err(|e| TpmError::Io(format!("the OS random generator failed: {e}")))?;
    let Some(tpm) = tpm else {
        return Ok(ProtectedKey::copy_from_secret_slice(&os[..len]));
    };
    let mut salt = Zeroizing::new([0u8; 32]);
    tpm.random(salt.as_mut())?;
    Ok(mix(&os, &salt, len))
}

fn mix(os: &[u8], salt: &[u8; 32], len: usize) -> ProtectedKey {
    let h = Hkdf::<Sha256>::new(Some(salt), os);
    ProtectedKey::new_with(len, |out| {
        h.expand(INFO, out)
            .expect("keys are far shorter than HKDF's 255 blocks");
    })
}

/// A P-256 private key (PKCS#8 DER, wiped when dropped) whose scalar is 32
/// bytes of `draw`. A 32-byte string is a valid scalar but for a chance of
/// about 2^-32 (at least the order, or zero): it draws again then.
pub(crate) fn p256_pkcs8_from(
    draw: impl Fn() -> Result<ProtectedKey, TpmError>,
) -> Result<Zeroizing<Vec<u8>>, TpmError> {
    use p256::pkcs8::EncodePrivateKey;
    for _ in 0..8 {
        let k = draw()?;
        if let Ok(sk) = p256::SecretKey::from_slice(k.expose_secret()) {
            let der = sk
                .to_pkcs8_der()
                .map_err(|e| TpmError::Io(format!("cannot encode a P-256 key: {e}")))?;
            return Ok(Zeroizing::new(der.as_bytes().to_vec()));
        }
    }
    Err(TpmError::Io("no valid P-256 key in 8 draws".into()))
}

/// Where keys get their randomness.
pub struct Entropy {
    tcti: Option<String>,
    warned: AtomicBool,
    /// TPM random bytes fetched ahead, 32 per key, each used once: one
    /// connection to the TPM serves [`POOL`] / 32 keys.
    pool: Mutex<Zeroizing<Vec<u8>>>,
}

/// How many TPM random bytes are fetched at a time.
const POOL: usize = 1024;

/// How long a key waits for the TPM's bytes before it is made from the OS
/// generator alone.
const WAIT: Duration = Duration::from_secs(10);

impl Entropy {
    /// The OS generator alone (logged once, at the first key).
    pub fn os_only() -> Self {
        Self {
            tcti: None,
            warned: AtomicBool::new(false),
            pool: Mutex::new(Zeroizing::new(Vec::new())),
        }
    }

    /// OS bytes mixed with those of the TPM at `tcti`; refused when the TPM
    /// does not give random bytes now.
    pub fn with_tpm(tcti: &str) -> Result<Self, TpmError> {
        let e = Self {
            tcti: Some(tcti.to_owned()),
            warned: AtomicBool::new(false),
            pool: Mutex::new(Zeroizing::new(Vec::with_capacity(POOL))),
        };
        e.tpm_salt()?;
        Ok(e)
    }

    /// Whether TPM bytes are mixed in.
    pub fn uses_tpm(&self) -> bool {
        self.tcti.is_some()
    }

    fn tpm_salt(&self) -> Result<Zeroizing<[u8; 32]>, TpmError> {
        let tcti = self
            .tcti
            .as_deref()
            .ok_or_else(|| TpmError::Config("no TPM is configured".into()))?;
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < 32 {
            let fresh = with_tpm(tcti, WAIT, |t| {
                let mut b = Zeroizing::new(vec![0u8; POOL]);
                t.random(&mut b)?;
                Ok(b)
            })?;
            pool.clear();
            pool.extend_from_slice(&fresh);
        }
        let mut salt = Zeroizing::new([0u8; 32]);
        let at = pool.len() - 32;
        salt.copy_from_slice(&pool[at..]);
        // Used once: wiped and dropped from the pool.
        pool[at..].iter_mut().for_each(|b| *b = 0);
        pool.truncate(at);
        Ok(salt)
    }

    /// A new ECDSA P-256 private key, PKCS#8 DER (for certificates): its
    /// scalar from [`Entropy::key`].
    pub fn p256_pkcs8(&self) -> Result<Zeroizing<Vec<u8>>, TpmError> {
        p256_pkcs8_from(|| self.key(32))
    }

    /// A new key of `len` bytes.
    pub fn key(&self, len: usize) -> Result<ProtectedKey, TpmError> {
        let mut os = Zeroizing::new(vec![0u8; len.max(32)]);
        getrandom::fill(&mut os)
            .map_err(|e| TpmError::Io(format!("the OS random generator failed: {e}")))?;
        match self.tpm_salt() {
            Ok(salt) => Ok(mix(&os, &salt, len)),
            Err(e) => {
                if !self.warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!("keys are made from the OS random generator alone: {e}");
                }
                Ok(ProtectedKey::copy_from_secret_slice(&os[..len]))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixing_depends_on_both_inputs_and_gives_the_length_asked() {
        let a = mix(&[1u8; 32], &[2u8; 32], 32);
        let b = mix(&[1u8; 32], &[3u8; 32], 32);
        let c = mix(&[4u8; 32], &[2u8; 32], 32);
        assert_ne!(a.expose_secret(), b.expose_secret());
        assert_ne!(a.expose_secret(), c.expose_secret());
        assert_eq!(mix(&[1u8; 64], &[2u8; 32], 64).len(), 64);
        assert_ne!(a.expose_secret(), &[1u8; 32]);
    }

    #[test]
    fn p256_keys_are_pkcs8_and_differ() {
        use p256::pkcs8::DecodePrivateKey;
        let e = Entropy::os_only();
        let a = e.p256_pkcs8().unwrap();
        let b = e.p256_pkcs8().unwrap();
        assert_ne!(*a, *b);
        assert!(p256::SecretKey::from_pkcs8_der(&a).is_ok());
    }

    #[test]
    fn without_a_tpm_keys_still_come() {
        let e = Entropy::os_only();
        let a = e.key(32).unwrap();
        let b = e.key(32).unwrap();
        assert_ne!(a.expose_secret(), b.expose_secret());
        assert!(!e.uses_tpm());
    }
}
