//! Strict reading of TPM-marshalled structures (TPM 2.0 Library, Part 2):
//! every length checked against its maximum and what is left, trailing
//! bytes refused, each error naming the structure and field. And the one
//! public-area layout guestkey accepts, ECC P-256 (`TPMT_PUBLIC`).

use p256::elliptic_curve::sec1::FromEncodedPoint;
use p256::{EncodedPoint, PublicKey};
use sha2::{Digest, Sha256};

use crate::tpm::verify::VerifyError;

pub(super) const ALG_ECC: u16 = 0x0023;
pub(super) const ALG_SHA256: u16 = 0x000B;
pub(super) const ALG_NULL: u16 = 0x0010;
pub(super) const ALG_AES: u16 = 0x0006;
pub(super) const ALG_ECDSA: u16 = 0x0018;
pub(super) const CURVE_P256: u16 = 0x0003;

/// A strict reader of TPM-marshalled bytes (big-endian).
pub(super) struct Reader<'a> {
    what: &'static str,
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub(super) fn new(what: &'static str, bytes: &'a [u8]) -> Self {
        Self { what, bytes, at: 0 }
    }

    pub(super) fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8], VerifyError> {
        if self.bytes.len() - self.at < n {
            return Err(VerifyError::Malformed(format!(
                "the {} ends inside its {field} (byte {} of {})",
                self.what,
                self.at,
                self.bytes.len()
            )));
        }
        let s = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    pub(super) fn u8(&mut self, field: &str) -> Result<u8, VerifyError> {
        Ok(self.take(1, field)?[0])
    }

    pub(super) fn u16(&mut self, field: &str) -> Result<u16, VerifyError> {
        let b = self.take(2, field)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub(super) fn u32(&mut self, field: &str) -> Result<u32, VerifyError> {
        let b = self.take(4, field)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(super) fn u64(&mut self, field: &str) -> Result<u64, VerifyError> {
        let b = self.take(8, field)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A TPM2B: a u16 size, then that many bytes (at most `max`).
    pub(super) fn sized(&mut self, field: &str, max: usize) -> Result<&'a [u8], VerifyError> {
        let n = usize::from(self.u16(field)?);
        if n > max {
            return Err(VerifyError::Malformed(format!(
                "the {}'s {field} is {n} bytes, more than the {max} it may have",
                self.what
            )));
        }
        self.take(n, field)
    }

    pub(super) fn end(&self) -> Result<(), VerifyError> {
        if self.at != self.bytes.len() {
            return Err(VerifyError::Malformed(format!(
                "the {} has {} bytes after its end",
                self.what,
                self.bytes.len() - self.at
            )));
        }
        Ok(())
    }
}

/// An ECC P-256 public key as the TPM describes it (`TPMT_PUBLIC`).
pub(super) struct EccPublic {
    pub(super) attributes: u32,
    pub(super) symmetric: Option<(u16, u16, u16)>,
    pub(super) scheme: Option<(u16, u16)>,
    pub(super) point: PublicKey,
    pub(super) x: [u8; 32],
    pub(super) name: Vec<u8>,
}

pub(super) fn read_ecc_public(what: &'static str, bytes: &[u8]) -> Result<EccPublic, VerifyError> {
    let mut r = Reader::new(what, bytes);
    let kind = r.u16("type")?;
    if kind != ALG_ECC {
        return Err(VerifyError::WrongKey(format!(
            "the {what} is not an ECC key (type {kind:#06x}): guestkey accepts ECC P-256 keys"
        )));
    }
    let name_alg = r.u16("name algorithm")?;
    if name_alg != ALG_SHA256 {
        return Err(VerifyError::WrongKey(format!(
            "the {what}'s name algorithm is {name_alg:#06x}, not SHA-256"
        )));
    }
    let attributes = r.u32("object attributes")?;
    r.sized("auth policy", 64)?;
    let sym_alg = r.u16("symmetric algorithm")?;
    // Only the layouts guestkey accepts are read further; any other
    // algorithm has other fields, and is refused by its id.
    let symmetric = if sym_alg == ALG_NULL {
        None
    } else if sym_alg != ALG_AES {
        return Err(VerifyError::WrongKey(format!(
            "the {what}'s symmetric algorithm is {sym_alg:#06x}: guestkey accepts AES or none"
        )));
    } else {
        Some((
            sym_alg,
            r.u16("symmetric key bits")?,
            r.u16("symmetric mode")?,
        ))
    };
    let scheme_alg = r.u16("scheme")?;
    let scheme = if scheme_alg == ALG_NULL {
        None
    } else if scheme_alg != ALG_ECDSA {
        return Err(VerifyError::WrongKey(format!(
            "the {what}'s scheme is {scheme_alg:#06x}: guestkey accepts ECDSA or none"
        )));
    } else {
        Some((scheme_alg, r.u16("scheme hash")?))
    };
    let curve = r.u16("curve")?;
    if curve != CURVE_P256 {
        return Err(VerifyError::WrongKey(format!(
            "the {what} is on curve {curve:#06x}, not NIST P-256"
        )));
    }
    if r.u16("key derivation scheme")? != ALG_NULL {
        return Err(VerifyError::WrongKey(format!(
            "the {what} names a key derivation scheme; it may not"
        )));
    }
    let x = r.sized("x coordinate", 32)?;
    let y = r.sized("y coordinate", 32)?;
    r.end()?;
    let (x, y) = (pad32(x), pad32(y));
    let encoded = EncodedPoint::from_affine_coordinates(&x.into(), &y.into(), false);
    let point = Option::from(PublicKey::from_encoded_point(&encoded)).ok_or_else(|| {
        VerifyError::WrongKey(format!("the {what}'s point is not on the P-256 curve"))
    })?;
    Ok(EccPublic {
        attributes,
        symmetric,
        scheme,
        point,
        x,
        name: name_of(bytes),
    })
}

pub(super) fn pad32(b: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out[32 - b.len()..].copy_from_slice(b);
    out
}

/// A TPM object's name: its name algorithm, then the hash of its public
/// area (`TPMT_PUBLIC`).
fn name_of(public: &[u8]) -> Vec<u8> {
    let mut name = ALG_SHA256.to_be_bytes().to_vec();
    name.extend_from_slice(&Sha256::digest(public));
    name
}
