//! The master key and envelope encryption of volume keys.
//!
//! Every volume key is stored only as XChaCha20-Poly1305 ciphertext under the
//! master key, with the volume id, the key generation and the master key's
//! id bound as associated data: a wrapped key copied to another volume or
//! generation row does not unwrap.
//!
//! The master key is 32 random bytes, written as base64 text. It is kept by
//! a [`guestkey_protect::KeyProtector`]: a file (default
//! `DATA_DIR/master.key`, mode 0600), an environment variable, or an
//! interactive prompt, chosen with `--master-key-source` (a
//! [`MasterKeySource`], which is the protector specification). A TPM
//! protector plugs in there without changes here.
//!
//! A leaf module: imports nothing of this crate.

use std::fmt;

use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use guestkey_protect::{Encoding, KeyProtector, ProtectError, ProtectedKey};
use secrecy::{ExposeSecret, SecretBox};
use sha2::{Digest, Sha256};
use xdr_wipe::packet::PacketSecret;

const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;

/// The master key. Not `Clone`; `Debug` redacts; wiped on drop.
pub struct MasterKey {
    key: SecretBox<[u8; 32]>,
    id: String,
}

/// Where the master key comes from: `file:PATH` (base64 text, mode 0600),
/// `env:VARIABLE` or `prompt`, parsed as before this type was the
/// protector specification.
pub type MasterKeySource = guestkey_protect::ProtectorSpec;

/// What the prompt asks for.
const PROMPT: &str = "guestkey master key";

/// The protector that keeps the master key named by `source`.
pub fn protector(source: &MasterKeySource) -> Box<dyn KeyProtector> {
    source.protector(Encoding::Base64, PROMPT)
}

/// Why the master key could not be obtained or used.
#[derive(Debug, thiserror::Error)]
pub enum MasterKeyError {
    /// Its protector could not store or hand out the key.
    #[error(transparent)]
    Protect(#[from] ProtectError),
    /// The key is not a base64-encoded 32-byte key.
    #[error("the master key from {0} is not 32 bytes of base64 (44 characters)")]
    Format(String),
    /// The OS RNG failed.
    #[error("the OS random number generator failed")]
    Random,
}

/// A wrapped key did not unwrap.
#[derive(Debug, thiserror::Error)]
pub enum UnwrapError {
    /// The row was wrapped under another master key.
    #[error("key is wrapped under master key {found}, but the server holds master key {held}")]
    OtherMasterKey {
        /// Id in the row.
        found: String,
        /// Id of the key held.
        held: String,
    },
    /// The stored recovery bundle does not unwrap.
    #[error("the stored recovery bundle fails authentication: the database was altered")]
    Bundle,
    /// The stored audit key does not unwrap.
    #[error("the stored audit key fails authentication: the database was altered")]
    AuditKey,
    /// Authentication failed: altered, or moved to another volume/generation.
    #[error(
        "stored key of volume {volume} generation {generation} fails authentication: the database was altered"
    )]
    Corrupt {
        /// Volume id.
        volume: String,
        /// Generation.
        generation: u64,
    },
}

impl MasterKey {
    /// A new random master key.
    pub fn generate() -> Result<Self, MasterKeyError> {
        let mut key = SecretBox::new(Box::new([0u8; 32]));
        getrandom::fill(secrecy::ExposeSecretMut::expose_secret_mut(&mut key))
            .map_err(|_| MasterKeyError::Random)?;
        Ok(Self::from_secret(key))
    }

    fn from_secret(key: SecretBox<[u8; 32]>) -> Self {
        let mut h = Sha256::new();
        h.update(b"guestkey master key id v1");
        h.update(key.expose_secret());
        let id = hex::encode(&h.finalize()[..8]);
        Self { key, id }
    }

    /// The key its protector handed out; `origin` names the source in the
    /// error when it is not 32 bytes.
    pub fn from_protected(key: &ProtectedKey, origin: &str) -> Result<Self, MasterKeyError> {
        let bytes: &[u8; 32] = key
            .expose_secret()
            .try_into()
            .map_err(|_| MasterKeyError::Format(origin.to_owned()))?;
        let mut secret = SecretBox::new(Box::new([0u8; 32]));
        secrecy::ExposeSecretMut::expose_secret_mut(&mut secret).copy_from_slice(bytes);
        Ok(Self::from_secret(secret))
    }

    /// Loads the key from `source`.
    pub fn load(source: &MasterKeySource) -> Result<Self, MasterKeyError> {
        let origin = source.to_string();
        let key = protector(source).unseal().map_err(|e| match e {
            // Same words for every kind of source, as before protectors.
            ProtectError::Format { .. } => MasterKeyError::Format(origin.clone()),
            other => MasterKeyError::Protect(other),
        })?;
        Self::from_protected(&key, &origin)
    }

    /// Stores the key where `source` names (a file: created, never
    /// overwritten; env and prompt sources cannot store one).
    pub fn store_new(&self, source: &MasterKeySource) -> Result<(), MasterKeyError> {
        let key = ProtectedKey::copy_from_secret_slice(self.key.expose_secret());
        Ok(protector(source).create(&key)?)
    }

    /// Public identifier: a truncated hash, safe to store and print.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(self.key.expose_secret().into())
    }

    fn aad(&self, volume: &str, generation: u64) -> Vec<u8> {
        let mut aad = b"guestkey volume key v1\0".to_vec();
        aad.extend_from_slice(volume.as_bytes());
        aad.push(0);
        aad.extend_from_slice(&generation.to_be_bytes());
        aad.extend_from_slice(self.id.as_bytes());
        aad
    }

    /// Wraps a volume key: nonce || ciphertext || tag.
    pub fn wrap(&self, volume: &str, generation: u64, key: &PacketSecret) -> Vec<u8> {
        let len = key.len();
        let mut out = vec![0u8; NONCE_LEN + len + TAG_LEN];
        getrandom::fill(&mut out[..NONCE_LEN]).expect("OS RNG for a nonce");
        let (nonce, rest) = out.split_at_mut(NONCE_LEN);
        let (body, tag_out) = rest.split_at_mut(len);
        body.copy_from_slice(key.expose_secret());
        let tag = self
            .cipher()
            .encrypt_inout_detached(&nonce_of(nonce), &self.aad(volume, generation), body.into())
            .expect("XChaCha20-Poly1305 takes any key-sized message");
        tag_out.copy_from_slice(&tag);
        out
    }

    /// Unwraps a volume key straight into wiped memory.
    pub fn unwrap_key(
        &self,
        volume: &str,
        generation: u64,
        master_key_id: &str,
        wrapped: &[u8],
    ) -> Result<PacketSecret, UnwrapError> {
        if master_key_id != self.id {
            return Err(UnwrapError::OtherMasterKey {
                found: master_key_id.to_owned(),
                held: self.id.clone(),
            });
        }
        let corrupt = || UnwrapError::Corrupt {
            volume: volume.to_owned(),
            generation,
        };
        if wrapped.len() < NONCE_LEN + TAG_LEN {
            return Err(corrupt());
        }
        let (nonce, rest) = wrapped.split_at(NONCE_LEN);
        let (body, tag) = rest.split_at(rest.len() - TAG_LEN);
        let mut ok = false;
        let secret = PacketSecret::new_with(body.len(), |buf| {
            buf.copy_from_slice(body);
            ok = self
                .cipher()
                .decrypt_inout_detached(
                    &nonce_of(nonce),
                    &self.aad(volume, generation),
                    buf.into(),
                    &Tag::try_from(tag).expect("split_at leaves exactly 16 tag bytes"),
                )
                .is_ok();
        })
        .map_err(|_| corrupt())?;
        if ok { Ok(secret) } else { Err(corrupt()) }
    }
}

impl MasterKey {
    fn audit_aad(&self) -> Vec<u8> {
        let mut aad = b"guestkey audit key v1\0".to_vec();
        aad.extend_from_slice(self.id.as_bytes());
        aad
    }

    /// Wraps the audit key: nonce || ciphertext || tag, bound to this
    /// master key's id.
    pub fn wrap_audit_key(&self, key: &AuditKey) -> Vec<u8> {
        let mut out = vec![0u8; NONCE_LEN + 32 + TAG_LEN];
        getrandom::fill(&mut out[..NONCE_LEN]).expect("OS RNG for a nonce");
        let (nonce, rest) = out.split_at_mut(NONCE_LEN);
        let (body, tag_out) = rest.split_at_mut(32);
        body.copy_from_slice(key.0.expose_secret());
        let tag = self
            .cipher()
            .encrypt_inout_detached(&nonce_of(nonce), &self.audit_aad(), body.into())
            .expect("XChaCha20-Poly1305 takes any key-sized message");
        tag_out.copy_from_slice(&tag);
        out
    }

    /// Unwraps the audit key straight into wiped memory.
    pub fn unwrap_audit_key(
        &self,
        master_key_id: &str,
        wrapped: &[u8],
    ) -> Result<AuditKey, UnwrapError> {
        if master_key_id != self.id {
            return Err(UnwrapError::OtherMasterKey {
                found: master_key_id.to_owned(),
                held: self.id.clone(),
            });
        }
        if wrapped.len() != NONCE_LEN + 32 + TAG_LEN {
            return Err(UnwrapError::AuditKey);
        }
        let (nonce, rest) = wrapped.split_at(NONCE_LEN);
        let (body, tag) = rest.split_at(32);
        let mut key = SecretBox::new(Box::new([0u8; 32]));
        let buf = secrecy::ExposeSecretMut::expose_secret_mut(&mut key);
        buf.copy_from_slice(body);
        self.cipher()
            .decrypt_inout_detached(
                &nonce_of(nonce),
                &self.audit_aad(),
                buf.as_mut_slice().into(),
                &Tag::try_from(tag).expect("split_at leaves exactly 16 tag bytes"),
            )
            // The box is wiped when dropped here.
            .map_err(|_| UnwrapError::AuditKey)?;
        Ok(AuditKey(key))
    }
}

impl MasterKey {
    /// The key as the base64 text of its file, for sealing it to the
    /// server's recovery key only (`guestkey-server recovery`).
    pub fn export_base64(&self) -> zeroize::Zeroizing<String> {
        use base64::Engine;
        let mut out = zeroize::Zeroizing::new(String::with_capacity(48));
        base64::engine::general_purpose::STANDARD.encode_string(self.key.expose_secret(), &mut out);
        out
    }

    /// The key from the text [`Self::export_base64`] made; `origin` names
    /// it in the error.
    pub fn from_base64(text: &str, origin: &str) -> Result<Self, MasterKeyError> {
        use base64::Engine;
        let mut secret = SecretBox::new(Box::new([0u8; 32]));
        let buf = secrecy::ExposeSecretMut::expose_secret_mut(&mut secret);
        match base64::engine::general_purpose::STANDARD.decode_slice(text.trim(), &mut buf[..]) {
            Ok(32) => Ok(Self::from_secret(secret)),
            _ => Err(MasterKeyError::Format(origin.to_owned())),
        }
    }

    fn bundle_aad(&self, context: &[u8]) -> Vec<u8> {
        let mut aad = b"guestkey recovery bundle v1\0".to_vec();
        aad.extend_from_slice(self.id.as_bytes());
        aad.push(0);
        aad.extend_from_slice(context);
        aad
    }

    /// Wraps the recovery bundle (the data directory's certificates and
    /// keys): nonce || ciphertext || tag, bound to this key's id and to
    /// `context` (what the record that holds it says).
    pub fn wrap_bundle(&self, plain: &[u8], context: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; NONCE_LEN + plain.len() + TAG_LEN];
        getrandom::fill(&mut out[..NONCE_LEN]).expect("OS RNG for a nonce");
        let (nonce, rest) = out.split_at_mut(NONCE_LEN);
        let (body, tag_out) = rest.split_at_mut(plain.len());
        body.copy_from_slice(plain);
        let tag = self
            .cipher()
            .encrypt_inout_detached(&nonce_of(nonce), &self.bundle_aad(context), body.into())
            .expect("XChaCha20-Poly1305 takes a bundle-sized message");
        tag_out.copy_from_slice(&tag);
        out
    }

    /// Unwraps the recovery bundle into wiped memory; `context` must be
    /// the one it was wrapped with.
    pub fn unwrap_bundle(
        &self,
        master_key_id: &str,
        wrapped: &[u8],
        context: &[u8],
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, UnwrapError> {
        if master_key_id != self.id {
            return Err(UnwrapError::OtherMasterKey {
                found: master_key_id.to_owned(),
                held: self.id.clone(),
            });
        }
        if wrapped.len() < NONCE_LEN + TAG_LEN {
            return Err(UnwrapError::Bundle);
        }
        let (nonce, rest) = wrapped.split_at(NONCE_LEN);
        let (body, tag) = rest.split_at(rest.len() - TAG_LEN);
        let mut buf = zeroize::Zeroizing::new(body.to_vec());
        self.cipher()
            .decrypt_inout_detached(
                &nonce_of(nonce),
                &self.bundle_aad(context),
                buf.as_mut_slice().into(),
                &Tag::try_from(tag).expect("split_at leaves exactly 16 tag bytes"),
            )
            .map_err(|_| UnwrapError::Bundle)?;
        Ok(buf)
    }
}

/// The key that MACs audit records and signs audit checkpoints: 32 random
/// bytes kept in the database only wrapped under the master key, so that
/// only the master key's holder can write or rewrite a record that
/// verifies. A master key rotation re-wraps it. Not `Clone`; `Debug`
/// redacts; wiped on drop.
pub struct AuditKey(SecretBox<[u8; 32]>);

type HmacSha256 = hmac::Hmac<Sha256>;

impl AuditKey {
    /// A new random audit key.
    pub fn generate() -> Result<Self, MasterKeyError> {
        let mut key = SecretBox::new(Box::new([0u8; 32]));
        getrandom::fill(secrecy::ExposeSecretMut::expose_secret_mut(&mut key))
            .map_err(|_| MasterKeyError::Random)?;
        Ok(Self(key))
    }

    fn hmac(&self, parts: &[&[u8]]) -> HmacSha256 {
        use hmac::{KeyInit, Mac};
        let mut m = <HmacSha256 as KeyInit>::new_from_slice(self.0.expose_secret())
            .expect("HMAC takes a key of any length");
        for p in parts {
            m.update(&(p.len() as u64).to_be_bytes());
            m.update(p);
        }
        m
    }

    /// The MAC (hex) of `parts`, each length-prefixed.
    pub fn mac(&self, parts: &[&[u8]]) -> String {
        use hmac::Mac;
        hex::encode(self.hmac(parts).finalize().into_bytes())
    }

    /// Whether `mac_hex` is the MAC of `parts` (compared in constant time).
    pub fn verify(&self, parts: &[&[u8]], mac_hex: &str) -> bool {
        use hmac::Mac;
        match hex::decode(mac_hex) {
            Ok(tag) => self.hmac(parts).verify_slice(&tag).is_ok(),
            Err(_) => false,
        }
    }
}

impl fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuditKey([REDACTED])")
    }
}

fn nonce_of(bytes: &[u8]) -> XNonce {
    XNonce::try_from(bytes).expect("callers split off exactly 24 nonce bytes")
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey(id {}, [REDACTED])", self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xdr_wipe::packet::generate_passphrase;

    #[test]
    fn wrap_unwrap_and_binding() {
        let mk = MasterKey::generate().unwrap();
        let key = generate_passphrase().unwrap();
        let wrapped = mk.wrap("vol-a", 1, &key);
        assert!(!wrapped.windows(key.len()).any(|w| w == key.expose_secret()));
        let back = mk.unwrap_key("vol-a", 1, mk.id(), &wrapped).unwrap();
        assert!(back.ct_eq(key.expose_secret()));
        // Moved to another volume or generation: refused.
        assert!(matches!(
            mk.unwrap_key("vol-b", 1, mk.id(), &wrapped),
            Err(UnwrapError::Corrupt { .. })
        ));
        assert!(matches!(
            mk.unwrap_key("vol-a", 2, mk.id(), &wrapped),
            Err(UnwrapError::Corrupt { .. })
        ));
        // Another master key: named.
        let other = MasterKey::generate().unwrap();
        let err = other.unwrap_key("vol-a", 1, mk.id(), &wrapped).unwrap_err();
        assert!(err.to_string().contains(mk.id()), "{err}");
        // Altered ciphertext: refused.
        let mut bad = wrapped.clone();
        bad[30] ^= 1;
        assert!(mk.unwrap_key("vol-a", 1, mk.id(), &bad).is_err());
        assert!(mk.unwrap_key("vol-a", 1, mk.id(), &bad[..10]).is_err());
    }

    fn temp_dir() -> std::path::PathBuf {
        let mut b = [0u8; 6];
        getrandom::fill(&mut b).unwrap();
        let d =
            std::env::temp_dir().join(format!("gk-mk-{}-{}", std::process::id(), hex::encode(b)));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn file_round_trip_and_bad_files() {
        use std::os::unix::fs::PermissionsExt;
        let d = temp_dir();
        let source = MasterKeySource::File(d.join("master.key"));
        let mk = MasterKey::generate().unwrap();
        mk.store_new(&source).unwrap();
        // Base64 text, 44 characters, mode 0600: the format of every data
        // directory made so far.
        let text = std::fs::read_to_string(d.join("master.key")).unwrap();
        assert_eq!(text.trim().len(), 44);
        let mode = std::fs::metadata(d.join("master.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(MasterKey::load(&source).unwrap().id(), mk.id());
        // Never overwritten.
        assert!(MasterKey::generate().unwrap().store_new(&source).is_err());
        assert_eq!(MasterKey::load(&source).unwrap().id(), mk.id());
        // A key file written by hand with white space around it loads.
        let hand = d.join("hand.key");
        std::fs::write(&hand, format!(" {}\n", text.trim())).unwrap();
        std::fs::set_permissions(&hand, std::fs::Permissions::from_mode(0o600)).unwrap();
        let again = MasterKey::load(&MasterKeySource::File(hand.clone())).unwrap();
        assert_eq!(again.id(), mk.id());
        for bad in ["", "abc", "!!!!", &"A".repeat(43), &"A".repeat(64)] {
            std::fs::write(&hand, bad).unwrap();
            let err = MasterKey::load(&MasterKeySource::File(hand.clone())).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "the master key from file:{} is not 32 bytes of base64 (44 characters)",
                    hand.display()
                )
            );
        }
        std::fs::set_permissions(&hand, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = MasterKey::load(&MasterKeySource::File(hand)).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
        assert!(!format!("{mk:?}").contains(text.trim()));
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn audit_keys_wrap_and_mac() {
        let mk = MasterKey::generate().unwrap();
        let ak = AuditKey::generate().unwrap();
        let wrapped = mk.wrap_audit_key(&ak);
        let back = mk.unwrap_audit_key(mk.id(), &wrapped).unwrap();
        let mac = ak.mac(&[b"a", b"bc"]);
        assert!(back.verify(&[b"a", b"bc"], &mac));
        // Length-prefixed: moving a byte between parts changes the MAC.
        assert!(!back.verify(&[b"ab", b"c"], &mac));
        assert!(!AuditKey::generate().unwrap().verify(&[b"a", b"bc"], &mac));
        assert!(!back.verify(&[b"a", b"bc"], "zz"));
        let mut bad = wrapped.clone();
        bad[30] ^= 1;
        assert!(mk.unwrap_audit_key(mk.id(), &bad).is_err());
        let other = MasterKey::generate().unwrap();
        assert!(other.unwrap_audit_key(mk.id(), &wrapped).is_err());
        assert!(other.unwrap_audit_key(other.id(), &wrapped).is_err());
        assert_eq!(format!("{ak:?}"), "AuditKey([REDACTED])");
    }

    #[test]
    fn sources_parse() {
        assert_eq!(
            "file:/x".parse::<MasterKeySource>().unwrap(),
            MasterKeySource::File("/x".into())
        );
        assert_eq!(
            "env:GK".parse::<MasterKeySource>().unwrap(),
            MasterKeySource::Env("GK".into())
        );
        assert_eq!(
            "prompt".parse::<MasterKeySource>().unwrap(),
            MasterKeySource::Prompt
        );
        for bad in ["", "file:", "env:", "vault:x", "promptx"] {
            assert!(bad.parse::<MasterKeySource>().is_err(), "{bad}");
        }
    }
}
