//! Sealing a key packet to one host: HPKE (RFC 9180) in base mode with
//! DHKEM(X25519, HKDF-SHA256), HKDF-SHA256 and ChaCha20-Poly1305.
//!
//! ```text
//! enum SealSuite { X25519_HKDF_SHA256_CHACHA20POLY1305 = 1 };
//! struct SealedHeader {            /* sent in clear, bound as AEAD data */
//!     PacketVersion version;  SealSuite suite;
//!     string host<255>;       opaque volume_id[16];  unsigned hyper generation;
//! };
//! struct SealedPacket {
//!     SealedHeader header;
//!     opaque enc[32];                   /* HPKE encapsulated key */
//!     opaque ciphertext<MAX_CIPHERTEXT>; /* sealed KeyPacket, then the 16-byte tag */
//! };
//! ```
//!
//! The header names the receiving host, the volume and the key generation,
//! and is the AEAD's associated data: a packet replayed to another host, for
//! another volume or for another generation is refused by name before any
//! decryption, and one whose header was edited to match does not decrypt.
//! TLS protects the channel; the seal protects the key all the way from the
//! server's key store into the host daemon's memory.

use std::fmt;

use hpke::aead::{AeadTag, ChaCha20Poly1305};
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use zeroize::Zeroizing;

use crate::codec::{Codec, decode, encode};
use crate::error::{Error, ErrorKind};
use crate::packet::{KeyPacket, MAX_HEADER_BACKUP, PacketVersion, VolumeId};
use crate::types::{Opaque, XdrString};

type Kem = X25519HkdfSha256;
type Kdf = HkdfSha256;
type Aead = ChaCha20Poly1305;

/// HPKE `info`: separates guestkey packets from any other use of the keys.
const INFO: &[u8] = b"guestkey sealed key packet v1";
/// Bytes of the AEAD tag at the end of the ciphertext.
pub const TAG_LEN: usize = 16;
/// Largest ciphertext: the largest key packet plus the tag.
pub const MAX_CIPHERTEXT: u32 = MAX_HEADER_BACKUP + 8192;

/// A host's name as the management server enrolled it.
pub type HostId = XdrString<255>;

crate::xdr_enum! {
    /// The HPKE suite of a sealed packet.
    pub enum SealSuite {
        /// DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305.
        X25519HkdfSha256ChaCha20Poly1305 = 1,
    }
}

crate::xdr_struct! {
    /// What a sealed packet says in clear about itself.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct SealedHeader {
        /// Format version.
        pub version: PacketVersion,
        /// HPKE suite.
        pub suite: SealSuite,
        /// The host the packet is sealed to.
        pub host: HostId,
        /// The volume whose key it holds.
        pub volume_id: VolumeId,
        /// The key generation it holds.
        pub generation: u64,
    }
}

crate::xdr_struct! {
    /// A key packet sealed to one host.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct SealedPacket {
        /// Clear header, bound to the ciphertext.
        pub header: SealedHeader,
        /// HPKE encapsulated key.
        pub enc: [u8; 32],
        /// The encrypted key packet followed by the AEAD tag.
        pub ciphertext: Opaque<MAX_CIPHERTEXT>,
    }
}

impl SealedPacket {
    /// The wire encoding (holds no secret in clear).
    pub fn to_bytes(&self) -> Vec<u8> {
        std::mem::take(&mut *encode(self))
    }

    /// Parses the wire encoding strictly.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        decode(bytes)
    }
}

/// A host's packet-sealing private key. Never leaves the host. Not `Clone`;
/// `Debug` redacts; wiped on drop.
pub struct HostSealingKey(Box<<Kem as hpke::Kem>::PrivateKey>);

/// A host's packet-sealing public key (the server seals packets to it).
#[derive(Clone, PartialEq, Eq)]
pub struct HostPublicKey([u8; 32]);

impl HostSealingKey {
    /// A new random key pair from the OS RNG.
    pub fn generate() -> Self {
        let (sk, _) = Kem::gen_keypair();
        Self(Box::new(sk))
    }

    /// The matching public key.
    pub fn public_key(&self) -> HostPublicKey {
        let pk = Kem::sk_to_pk(&self.0);
        let mut out = [0u8; 32];
        pk.write_exact(&mut out);
        HostPublicKey(out)
    }

    /// Restores a key from its 32 secret bytes (as stored sealed on the host).
    pub fn from_secret_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        <Kem as hpke::Kem>::PrivateKey::from_bytes(bytes)
            .map(|sk| Self(Box::new(sk)))
            .map_err(|_| KeyError("a sealing private key is 32 bytes"))
    }

    /// The 32 secret bytes, for sealed storage on the host only.
    pub fn expose_secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        let mut out = Zeroizing::new([0u8; 32]);
        self.0.write_exact(out.as_mut());
        out
    }
}

impl fmt::Debug for HostSealingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HostSealingKey([REDACTED])")
    }
}

impl HostPublicKey {
    /// Parses 32 bytes of X25519 public key.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|_| KeyError("a sealing public key is 32 bytes"))?;
        // Validate now rather than at the first seal.
        let pk = <Kem as hpke::Kem>::PublicKey::from_bytes(&key)
            .map_err(|_| KeyError("not a valid X25519 public key"))?;
        // A low-order point (all zeros, one, and the other points of small
        // order, in any of their encodings) gives an all-zero shared secret:
        // HPKE refuses to seal to it (RFC 9180, 7.1.4). Refuse it here, at
        // the edge, with one trial seal of nothing.
        hpke::single_shot_seal_inout_detached::<Aead, Kdf, Kem>(
            &OpModeS::Base,
            &pk,
            b"guestkey public key check",
            (&mut [][..]).into(),
            b"",
        )
        .map_err(|_| KeyError("a low-order X25519 public key: no key can be sealed to it"))?;
        Ok(Self(key))
    }

    /// The 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for HostPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostPublicKey(")?;
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

/// A sealing key could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid sealing key: {0}")]
pub struct KeyError(&'static str);

/// Why a packet could not be sealed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The packet breaks a rule of the format.
    #[error("key packet field `{field}` is invalid: {what}")]
    InvalidPacket {
        /// The field.
        field: &'static str,
        /// What is wrong.
        what: &'static str,
    },
    /// The receiving host's public key was refused by HPKE.
    #[error("cannot seal to this host's public key (re-enroll the host)")]
    Recipient,
}

/// Why a sealed packet was refused. Messages name what to check; none
/// contains key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The envelope is not valid XDR.
    #[error("malformed sealed packet: {0}")]
    Malformed(#[source] Error),
    /// The envelope is for another host.
    #[error("packet is sealed for host {sealed_for:?}, not for this host ({this_host:?})")]
    WrongHost {
        /// Host named in the packet.
        sealed_for: String,
        /// This host.
        this_host: String,
    },
    /// The envelope is for another volume than the command names.
    #[error("packet holds the key of volume {found}, but the command is for volume {expected}")]
    WrongVolume {
        /// Volume named in the packet.
        found: VolumeId,
        /// Volume the command names.
        expected: VolumeId,
    },
    /// The envelope is for another key generation than the command names.
    #[error(
        "packet holds key generation {found} of volume {volume}, but the command expects generation {expected}"
    )]
    WrongGeneration {
        /// Volume.
        volume: VolumeId,
        /// Generation in the packet.
        found: u64,
        /// Generation the command names.
        expected: u64,
    },
    /// Authentication failed.
    #[error(
        "packet does not decrypt with this host's sealing key: it was altered, or sealed to another key (was the host re-enrolled?)"
    )]
    Decrypt,
    /// The decrypted packet is not a valid key packet.
    #[error("decrypted key packet is malformed: {0}")]
    InvalidPacket(#[source] Error),
    /// The decrypted packet contradicts its envelope.
    #[error("decrypted key packet does not match its envelope (volume or generation differ)")]
    Inconsistent,
}

/// Seals `packet` to `host`, whose public key is `recipient`.
pub fn seal(
    packet: &KeyPacket,
    host: &HostId,
    recipient: &HostPublicKey,
) -> Result<SealedPacket, SealError> {
    let _wipe = crate::secret::StackWipe;
    packet
        .check()
        .map_err(|(field, what)| SealError::InvalidPacket { field, what })?;
    let pk = <Kem as hpke::Kem>::PublicKey::from_bytes(&recipient.0)
        .map_err(|_| SealError::Recipient)?;
    let header = SealedHeader {
        version: PacketVersion::V1,
        suite: SealSuite::X25519HkdfSha256ChaCha20Poly1305,
        host: host.clone(),
        volume_id: packet.volume_id,
        generation: packet.generation,
    };
    let aad = encode(&header);

    // One buffer, sized up front for packet and tag: the packet is encoded
    // into it and encrypted in place, so the clear packet exists only there,
    // and only until it becomes ciphertext.
    let len = packet.encoded_len();
    let mut buf = crate::Writer::with_capacity(len + TAG_LEN);
    packet.encode(&mut buf);
    let mut buf = buf.finish();
    let (enc, tag) = hpke::single_shot_seal_inout_detached::<Aead, Kdf, Kem>(
        &OpModeS::Base,
        &pk,
        INFO,
        buf.as_mut_slice().into(),
        &aad,
    )
    .map_err(|_| SealError::Recipient)?;
    buf.extend_from_slice(&tag.to_bytes());
    let mut enc_bytes = [0u8; 32];
    enc.write_exact(&mut enc_bytes);
    let ciphertext = Opaque::new(std::mem::take(&mut *buf))
        .expect("a checked packet plus tag fits in MAX_CIPHERTEXT");
    Ok(SealedPacket {
        header,
        enc: enc_bytes,
        ciphertext,
    })
}

/// Opens a sealed packet on `this_host` for the command that names
/// `volume` and `generation`. Checks the envelope before decrypting.
pub fn open(
    bytes: &[u8],
    key: &HostSealingKey,
    this_host: &HostId,
    volume: VolumeId,
    generation: u64,
) -> Result<KeyPacket, OpenError> {
    let _wipe = crate::secret::StackWipe;
    let sealed = SealedPacket::from_bytes(bytes).map_err(OpenError::Malformed)?;
    let h = &sealed.header;
    if h.host != *this_host {
        return Err(OpenError::WrongHost {
            sealed_for: h.host.to_string(),
            this_host: this_host.to_string(),
        });
    }
    if h.volume_id != volume {
        return Err(OpenError::WrongVolume {
            found: h.volume_id,
            expected: volume,
        });
    }
    if h.generation != generation {
        return Err(OpenError::WrongGeneration {
            volume,
            found: h.generation,
            expected: generation,
        });
    }
    let aad = encode(&sealed.header);
    let header = sealed.header;
    let mut ct = sealed.ciphertext.into_inner();
    if ct.len() < TAG_LEN {
        let at = bytes.len() - ct.len();
        return Err(OpenError::Malformed(Error::new(
            ErrorKind::Invalid("ciphertext is shorter than its authentication tag"),
            "ciphertext".to_owned(),
            at,
        )));
    }
    let tag =
        AeadTag::<Aead>::from_bytes(&ct[ct.len() - TAG_LEN..]).map_err(|_| OpenError::Decrypt)?;
    ct.truncate(ct.len() - TAG_LEN);
    // Decrypt in place, in a buffer wiped on drop.
    let mut plain = Zeroizing::new(ct);
    let enc =
        <Kem as hpke::Kem>::EncappedKey::from_bytes(&sealed.enc).map_err(|_| OpenError::Decrypt)?;
    hpke::single_shot_open_inout_detached::<Aead, Kdf, Kem>(
        &OpModeR::Base,
        &key.0,
        &enc,
        INFO,
        plain.as_mut_slice().into(),
        &aad,
        &tag,
    )
    .map_err(|_| OpenError::Decrypt)?;
    let packet: KeyPacket = decode(&plain).map_err(OpenError::InvalidPacket)?;
    if packet.volume_id != header.volume_id || packet.generation != header.generation {
        return Err(OpenError::Inconsistent);
    }
    Ok(packet)
}
