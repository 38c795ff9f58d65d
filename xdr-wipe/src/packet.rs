//! The key packet, version 1: the one format in which a volume key travels
//! from the management server to a host daemon (inside a sealed envelope,
//! see [`crate::seal`]).
//!
//! ```text
//! enum PacketVersion { V1 = 1 };
//! enum Mechanism { QEMU_LUKS_PASSPHRASE = 1, LUKS_VOLUME_KEY = 2,
//!                  QEMU_LUKS_PASSPHRASE_HALF = 3 };
//! enum VolumeFormat { RAW = 1, QCOW2 = 2 };
//! enum LuksVersion { LUKS1 = 1, LUKS2 = 2 };
//! struct CipherParams {
//!     VolumeFormat format;  LuksVersion luks_version;
//!     string cipher<32>;    unsigned int cipher_bits;
//!     string mode<32>;      string ivgen<32>;  string hash<32>;
//!     unsigned int pbkdf_iterations;
//! };
//! union Recovery switch (int kind) {
//!     case 0: void;
//!     case 1: opaque data_key<128>;        /* secret */
//!     case 2: opaque header_backup<32 MiB>; /* secret */
//! };
//! struct KeyPacket {
//!     PacketVersion version;  opaque volume_id[16];  unsigned hyper generation;
//!     Mechanism mechanism;    CipherParams params;
//!     opaque secret<1024>;    /* secret */
//!     Recovery recovery;
//! };
//! ```
//!
//! Mechanism values are never reused; new ones are added with new numbers,
//! and a host that does not know a value refuses the packet by name.

use std::fmt;

use base64::Engine as _;
use zeroize::Zeroizing;

use crate::codec::Codec;
use crate::error::{Error, ErrorKind};
use crate::reader::Reader;
use crate::secret::SecretOpaque;
use crate::types::XdrString;
use crate::writer::Writer;

/// Largest `secret` field.
pub const MAX_SECRET: u32 = 1024;
/// Largest LUKS data-encryption (volume) key in a packet.
pub const MAX_DATA_KEY: u32 = 128;
/// Largest LUKS header backup (a LUKS2 default header is 16 MiB).
pub const MAX_HEADER_BACKUP: u32 = 32 << 20;

/// Bytes of randomness in a generated passphrase (256 bits).
pub const PASSPHRASE_ENTROPY_BYTES: usize = 32;
/// Length of a generated passphrase as base64url text without padding.
pub const PASSPHRASE_LEN: usize = 43;

/// The secret a packet carries.
pub type PacketSecret = SecretOpaque<MAX_SECRET>;

crate::xdr_enum! {
    /// Version of the packet format.
    pub enum PacketVersion {
        /// Version 1, described in this module.
        V1 = 1,
    }
}

crate::xdr_enum! {
    /// What the secret is and how the host uses it.
    pub enum Mechanism {
        /// The passphrase libvirt hands QEMU for a LUKS keyslot (a libvirt
        /// secret of usage type `volume`). Must be UTF-8 text.
        QemuLuksPassphrase = 1,
        /// A LUKS volume (data-encryption) key of 256 or 512 bits.
        LuksVolumeKey = 2,
        /// One half of a split QEMU LUKS passphrase: 32 random bytes. The
        /// management server keeps one half, a verifier server the other;
        /// the passphrase is the unpadded base64url text of their XOR
        /// ([`combine_halves`]), so neither server alone knows it.
        QemuLuksPassphraseHalf = 3,
    }
}

crate::xdr_enum! {
    /// The container format of the volume.
    pub enum VolumeFormat {
        /// A raw LUKS volume.
        Raw = 1,
        /// qcow2 with LUKS encryption inside.
        Qcow2 = 2,
    }
}

crate::xdr_enum! {
    /// LUKS header version.
    pub enum LuksVersion {
        /// LUKS1 (what QEMU creates).
        Luks1 = 1,
        /// LUKS2.
        Luks2 = 2,
    }
}

crate::xdr_struct! {
    /// Cipher and format parameters, as in libvirt's `<encryption>` element.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct CipherParams {
        /// Container format.
        pub format: VolumeFormat,
        /// LUKS header version.
        pub luks_version: LuksVersion,
        /// Cipher name, e.g. `aes`.
        pub cipher: XdrString<32>,
        /// Cipher key size in bits, e.g. 256.
        pub cipher_bits: u32,
        /// Cipher mode, e.g. `xts`.
        pub mode: XdrString<32>,
        /// IV generator, e.g. `plain64`.
        pub ivgen: XdrString<32>,
        /// Hash, e.g. `sha256`.
        pub hash: XdrString<32>,
        /// PBKDF iterations for new keyslots. The key is random, so stretching
        /// adds no security; a low count keeps guest start fast.
        pub pbkdf_iterations: u32,
    }
}

impl CipherParams {
    /// AES-256-XTS with plain64 IVs and SHA-256, as QEMU creates by default,
    /// for `format`, with the minimum useful PBKDF iteration count.
    pub fn aes_xts(format: VolumeFormat) -> Self {
        // Infallible: the literals are shorter than the declared maxima.
        let s = |v: &str| XdrString::new(v).expect("literal fits in string<32>");
        Self {
            format,
            luks_version: LuksVersion::Luks1,
            cipher: s("aes"),
            cipher_bits: 256,
            mode: s("xts"),
            ivgen: s("plain64"),
            hash: s("sha256"),
            pbkdf_iterations: 1000,
        }
    }
}

crate::xdr_union! {
    /// Recovery material that may travel with the key.
    pub enum Recovery {
        void {
            /// Nothing.
            None = 0,
        }
        arms {
            /// The LUKS data-encryption key (256 or 512 bits).
            DataKey(SecretOpaque<MAX_DATA_KEY>) = 1,
            /// A LUKS header backup (`cryptsetup luksHeaderBackup`).
            HeaderBackup(SecretOpaque<MAX_HEADER_BACKUP>) = 2,
        }
    }
}

impl fmt::Debug for Recovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::DataKey(_) => f.write_str("DataKey([REDACTED])"),
            Self::HeaderBackup(b) => write!(f, "HeaderBackup([REDACTED {} bytes])", b.len()),
        }
    }
}

/// A volume's identity: the UUID guestkey gives it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeId(pub uuid::Uuid);

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl fmt::Debug for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VolumeId({self})")
    }
}

impl Codec for VolumeId {
    const MIN_ENCODED_LEN: usize = 16;
    fn encoded_len(&self) -> usize {
        16
    }
    fn encode(&self, w: &mut Writer) {
        self.0.as_bytes().encode(w);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, Error> {
        Ok(Self(uuid::Uuid::from_bytes(<[u8; 16]>::decode(r)?)))
    }
}

/// A volume key on its way to a host. Not `Clone`; `Debug` redacts the secret.
pub struct KeyPacket {
    /// Format version (always V1 here).
    pub version: PacketVersion,
    /// The volume the key opens.
    pub volume_id: VolumeId,
    /// Key generation: increases with every rotation of this volume's key.
    pub generation: u64,
    /// What the secret is.
    pub mechanism: Mechanism,
    /// Cipher and format parameters.
    pub params: CipherParams,
    /// The key.
    pub secret: PacketSecret,
    /// Optional recovery material.
    pub recovery: Recovery,
}

impl fmt::Debug for KeyPacket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPacket")
            .field("version", &self.version)
            .field("volume_id", &self.volume_id)
            .field("generation", &self.generation)
            .field("mechanism", &self.mechanism)
            .field("params", &self.params)
            .field("secret", &self.secret)
            .field("recovery", &self.recovery)
            .finish()
    }
}

impl KeyPacket {
    /// A version 1 packet carrying a QEMU LUKS passphrase and no recovery
    /// material.
    pub fn passphrase(
        volume_id: VolumeId,
        generation: u64,
        params: CipherParams,
        secret: PacketSecret,
    ) -> Self {
        Self {
            version: PacketVersion::V1,
            volume_id,
            generation,
            mechanism: Mechanism::QemuLuksPassphrase,
            params,
            secret,
            recovery: Recovery::None,
        }
    }

    /// Checks the rules XDR alone cannot express. Returns the name of the
    /// offending field and what is wrong.
    pub fn check(&self) -> Result<(), (&'static str, &'static str)> {
        check_secret(self.mechanism, self.secret.expose_secret()).map_err(|e| ("secret", e))?;
        match &self.recovery {
            Recovery::None => Ok(()),
            Recovery::DataKey(k) if matches!(k.len(), 32 | 64) => Ok(()),
            Recovery::DataKey(_) => Err(("recovery.DataKey", "data key must be 32 or 64 bytes")),
            Recovery::HeaderBackup(b) if !b.is_empty() => Ok(()),
            Recovery::HeaderBackup(_) => {
                Err(("recovery.HeaderBackup", "header backup must not be empty"))
            }
        }
    }
}

fn check_secret(mechanism: Mechanism, secret: &[u8]) -> Result<(), &'static str> {
    match mechanism {
        Mechanism::QemuLuksPassphrase if secret.is_empty() => Err("passphrase must not be empty"),
        // qemu-img refuses a secret that is not UTF-8; QEMU reads it as a C string.
        Mechanism::QemuLuksPassphrase if std::str::from_utf8(secret).is_err() => {
            Err("passphrase must be UTF-8 text")
        }
        Mechanism::QemuLuksPassphrase if secret.contains(&0) => {
            Err("passphrase must not contain NUL bytes")
        }
        Mechanism::QemuLuksPassphrase => Ok(()),
        Mechanism::LuksVolumeKey if matches!(secret.len(), 32 | 64) => Ok(()),
        Mechanism::LuksVolumeKey => Err("LUKS volume key must be 32 or 64 bytes"),
        Mechanism::QemuLuksPassphraseHalf if secret.len() == PASSPHRASE_ENTROPY_BYTES => Ok(()),
        Mechanism::QemuLuksPassphraseHalf => Err("a passphrase half must be 32 bytes"),
    }
}

/// New random bytes for one half of a split passphrase.
pub fn generate_half() -> Result<PacketSecret, getrandom::Error> {
    let mut result = Ok(());
    let half = PacketSecret::new_with(PASSPHRASE_ENTROPY_BYTES, |out| {
        result = getrandom::fill(out);
    })
    .expect("32 bytes is below MAX_SECRET");
    result.map(|()| half)
}

/// Why two packets are not the halves of one split passphrase.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HalvesError {
    /// A packet is not a half.
    #[error("the {0} packet is not a passphrase half")]
    NotAHalf(&'static str),
    /// The halves are of different volumes or generations.
    #[error("the halves are of different volumes or key generations")]
    Mismatch,
}

/// The passphrase of a split key: the unpadded base64url text of
/// `mine` XOR `other` (both [`Mechanism::QemuLuksPassphraseHalf`] packets
/// of one volume and generation), in a packet with `mine`'s parameters.
/// The XOR is made in wiped memory.
pub fn combine_halves(mine: &KeyPacket, other: &KeyPacket) -> Result<KeyPacket, HalvesError> {
    for (p, which) in [(mine, "first"), (other, "second")] {
        if p.mechanism != Mechanism::QemuLuksPassphraseHalf
            || p.secret.len() != PASSPHRASE_ENTROPY_BYTES
        {
            return Err(HalvesError::NotAHalf(which));
        }
    }
    if mine.volume_id != other.volume_id || mine.generation != other.generation {
        return Err(HalvesError::Mismatch);
    }
    let mut raw = Zeroizing::new([0u8; PASSPHRASE_ENTROPY_BYTES]);
    for (r, (a, b)) in raw.iter_mut().zip(
        mine.secret
            .expose_secret()
            .iter()
            .zip(other.secret.expose_secret()),
    ) {
        *r = a ^ b;
    }
    Ok(KeyPacket::passphrase(
        mine.volume_id,
        mine.generation,
        mine.params.clone(),
        passphrase_from_random(&raw),
    ))
}

impl Codec for KeyPacket {
    fn encoded_len(&self) -> usize {
        self.version.encoded_len()
            + self.volume_id.encoded_len()
            + self.generation.encoded_len()
            + self.mechanism.encoded_len()
            + self.params.encoded_len()
            + self.secret.encoded_len()
            + self.recovery.encoded_len()
    }

    fn encode(&self, w: &mut Writer) {
        self.version.encode(w);
        self.volume_id.encode(w);
        self.generation.encode(w);
        self.mechanism.encode(w);
        self.params.encode(w);
        self.secret.encode(w);
        self.recovery.encode(w);
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, Error> {
        let version = r.field("version", PacketVersion::decode)?;
        let volume_id = r.field("volume_id", VolumeId::decode)?;
        let generation = r.field("generation", u64::decode)?;
        let mechanism = r.field("mechanism", Mechanism::decode)?;
        let params = r.field("params", CipherParams::decode)?;
        let secret_at = r.offset();
        let secret = r.field("secret", PacketSecret::decode)?;
        if let Err(what) = check_secret(mechanism, secret.expose_secret()) {
            return Err(r.field_error_at("secret", secret_at, ErrorKind::Invalid(what)));
        }
        let recovery_at = r.offset();
        let recovery = r.field("recovery", Recovery::decode)?;
        let packet = Self {
            version,
            volume_id,
            generation,
            mechanism,
            params,
            secret,
            recovery,
        };
        // The secret passed its check above: what is left is the recovery arm.
        if let Err((_, what)) = packet.check() {
            return Err(r.field_error_at("recovery", recovery_at, ErrorKind::Invalid(what)));
        }
        Ok(packet)
    }
}

/// A new volume passphrase: 256 bits from the OS RNG as base64url text
/// (43 characters), built in place in wiped memory.
pub fn generate_passphrase() -> Result<PacketSecret, getrandom::Error> {
    let mut raw = Zeroizing::new([0u8; PASSPHRASE_ENTROPY_BYTES]);
    getrandom::fill(raw.as_mut())?;
    Ok(passphrase_from_random(&raw))
}

/// The passphrase of 32 random bytes `raw` (made elsewhere, e.g. with TPM
/// random bytes mixed in): their unpadded URL-safe base64.
pub fn passphrase_from_random(raw: &[u8; PASSPHRASE_ENTROPY_BYTES]) -> PacketSecret {
    PacketSecret::new_with(PASSPHRASE_LEN, |out| {
        // 32 bytes always encode to exactly 43 unpadded base64 characters.
        let written = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode_slice(raw.as_ref(), out)
            .expect("43 bytes hold the encoding of 32");
        debug_assert_eq!(written, PASSPHRASE_LEN);
    })
    .expect("43 bytes is below MAX_SECRET")
}

/// Size of a LUKS data-encryption key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataKeySize {
    /// 256 bits (AES-128-XTS).
    Bits256,
    /// 512 bits (AES-256-XTS).
    Bits512,
}

/// A new random LUKS data-encryption key, built in place in wiped memory.
pub fn generate_data_key(
    size: DataKeySize,
) -> Result<SecretOpaque<MAX_DATA_KEY>, getrandom::Error> {
    let len = match size {
        DataKeySize::Bits256 => 32,
        DataKeySize::Bits512 => 64,
    };
    let mut result = Ok(());
    let key = SecretOpaque::new_with(len, |out| result = getrandom::fill(out))
        .expect("64 bytes is below MAX_DATA_KEY");
    result.map(|()| key)
}
