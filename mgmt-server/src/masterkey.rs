//! The master key and envelope encryption of volume keys.
//!
//! Every volume key is stored only as XChaCha20-Poly1305 ciphertext under the
//! master key, with the volume id, the key generation and the master key's
//! id bound as associated data: a wrapped key copied to another volume or
//! generation row does not unwrap.
//!
//! The master key is 32 random bytes, written as base64 text. It comes from
//! a file (default `DATA_DIR/master.key`, mode 0600), an environment
//! variable, or an interactive prompt, chosen with `--master-key-source`.

use std::fmt;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::Engine as _;
use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use secrecy::{ExposeSecret, SecretBox};
use sha2::{Digest, Sha256};
use xdr_wipe::packet::PacketSecret;
use zeroize::Zeroizing;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;

/// The master key. Not `Clone`; `Debug` redacts; wiped on drop.
pub struct MasterKey {
    key: SecretBox<[u8; 32]>,
    id: String,
}

/// Where the master key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MasterKeySource {
    /// A file holding the key as base64 text (mode 0600).
    File(PathBuf),
    /// An environment variable holding the key as base64 text.
    Env(String),
    /// Typed (or pasted) at start-up on the terminal.
    Prompt,
}

impl FromStr for MasterKeySource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("file", path)) if !path.is_empty() => Ok(Self::File(path.into())),
            Some(("env", var)) if !var.is_empty() => Ok(Self::Env(var.to_owned())),
            None if s == "prompt" => Ok(Self::Prompt),
            _ => Err(format!(
                "`{s}` is not a master key source: use file:PATH, env:VARIABLE or prompt"
            )),
        }
    }
}

impl fmt::Display for MasterKeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(p) => write!(f, "file:{}", p.display()),
            Self::Env(v) => write!(f, "env:{v}"),
            Self::Prompt => f.write_str("prompt"),
        }
    }
}

/// Why the master key could not be obtained or used.
#[derive(Debug, thiserror::Error)]
pub enum MasterKeyError {
    /// Reading the key file failed.
    #[error("cannot read the master key file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The key file is readable by others.
    #[error("master key file {0} is readable by group or others: chmod 600 it")]
    Permissions(PathBuf),
    /// The environment variable is not set.
    #[error("environment variable {0} (the master key source) is not set")]
    MissingEnv(String),
    /// Prompting failed.
    #[error("cannot prompt for the master key: {0}")]
    Prompt(String),
    /// The text is not a base64-encoded 32-byte key.
    #[error("the master key from {0} is not 32 bytes of base64 (44 characters)")]
    Format(String),
    /// The OS RNG failed.
    #[error("the OS random number generator failed")]
    Random,
    /// Writing a new key file failed.
    #[error("cannot write the master key file {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
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

    /// Parses base64 text (surrounding white space ignored).
    pub fn from_text(text: &str, origin: &str) -> Result<Self, MasterKeyError> {
        let mut key = SecretBox::new(Box::new([0u8; 32]));
        let decoded = B64
            .decode_slice(
                text.trim(),
                secrecy::ExposeSecretMut::expose_secret_mut(&mut key),
            )
            .map_err(|_| MasterKeyError::Format(origin.to_owned()))?;
        if decoded != 32 {
            return Err(MasterKeyError::Format(origin.to_owned()));
        }
        Ok(Self::from_secret(key))
    }

    /// Loads the key from `source`.
    pub fn load(source: &MasterKeySource) -> Result<Self, MasterKeyError> {
        match source {
            MasterKeySource::File(path) => {
                use std::os::unix::fs::PermissionsExt;
                let read = |source| MasterKeyError::Read {
                    path: path.clone(),
                    source,
                };
                let meta = std::fs::metadata(path).map_err(read)?;
                if meta.permissions().mode() & 0o077 != 0 {
                    return Err(MasterKeyError::Permissions(path.clone()));
                }
                let text = Zeroizing::new(std::fs::read_to_string(path).map_err(read)?);
                Self::from_text(&text, &source.to_string())
            }
            MasterKeySource::Env(var) => {
                let text = Zeroizing::new(
                    std::env::var(var).map_err(|_| MasterKeyError::MissingEnv(var.clone()))?,
                );
                Self::from_text(&text, &source.to_string())
            }
            MasterKeySource::Prompt => {
                let stdin = std::io::stdin();
                if stdin.is_terminal() {
                    let mut err = std::io::stderr();
                    let _ = write!(err, "guestkey master key (base64): ");
                    let _ = err.flush();
                }
                let mut line = Zeroizing::new(String::with_capacity(128));
                stdin
                    .lock()
                    .read_line(&mut line)
                    .map_err(|e| MasterKeyError::Prompt(e.to_string()))?;
                Self::from_text(&line, "the prompt")
            }
        }
    }

    /// Writes the key as base64 text to a new file with mode 0600.
    pub fn write_new_file(&self, path: &Path) -> Result<(), MasterKeyError> {
        let text = Zeroizing::new(B64.encode(self.key.expose_secret()));
        crate::datadir::write_private_file(path, text.as_bytes()).map_err(|source| {
            MasterKeyError::Write {
                path: path.to_owned(),
                source,
            }
        })
    }

    /// The key as base64 text, for handing to an operator once.
    pub fn expose_text(&self) -> Zeroizing<String> {
        Zeroizing::new(B64.encode(self.key.expose_secret()))
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

    #[test]
    fn text_round_trip_and_bad_text() {
        let mk = MasterKey::generate().unwrap();
        let again = MasterKey::from_text(&format!(" {}\n", *mk.expose_text()), "test").unwrap();
        assert_eq!(again.id(), mk.id());
        for bad in ["", "abc", "!!!!", &"A".repeat(43), &"A".repeat(64)] {
            let err = MasterKey::from_text(bad, "env:X").unwrap_err();
            assert_eq!(
                err.to_string(),
                "the master key from env:X is not 32 bytes of base64 (44 characters)"
            );
        }
        assert!(!format!("{mk:?}").contains(&*mk.expose_text()));
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
