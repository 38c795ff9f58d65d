//! The verifier's side of remote attestation, in software (no TPM needed):
//! reading a host's EK and AK, TPM2_MakeCredential for the AK's proof of
//! residence, and the checks of a quote.
//!
//! Every structure is read strictly (each length checked against what is
//! left, trailing bytes refused), and an AK is accepted only with the
//! attributes that make its quotes mean something: restricted (the TPM
//! signs only what it produced), fixed to this TPM and its parent, made
//! inside the TPM, a signing key and not a decryption key.
//!
//! Formats: TPM 2.0 Library, Part 2 (structures) and Part 1 §24 (credential
//! protection, KDFa and KDFe).

use aes::Aes128;
use cfb_mode::Encryptor;
use cfb_mode::cipher::KeyIvInit;
use hmac::{Hmac, KeyInit, Mac};
use p256::SecretKey;
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use p256::ecdsa::{Signature as EcdsaSignature, VerifyingKey};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::tpm::marshal::{
    ALG_AES, ALG_ECDSA, ALG_SHA256, EccPublic, Reader, pad32, read_ecc_public,
};
use crate::tpm::pcr::{PcrSelection, PcrValues};

const ALG_CFB: u16 = 0x0043;
const GENERATED: u32 = 0xff54_4347;
const ST_ATTEST_QUOTE: u16 = 0x8018;

const FIXED_TPM: u32 = 1 << 1;
const FIXED_PARENT: u32 = 1 << 4;
const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
const RESTRICTED: u32 = 1 << 16;
const DECRYPT: u32 = 1 << 17;
const SIGN: u32 = 1 << 18;

/// Why something a host sent does not verify. Each message says what was
/// wrong; none contains a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The bytes are not the structure they claim to be.
    #[error("{0}")]
    Malformed(String),
    /// A key is of a kind or with attributes that are not accepted.
    #[error("{0}")]
    WrongKey(String),
    /// The signature does not verify with the pinned AK.
    #[error("{0}")]
    BadSignature(String),
    /// The quote was not made for this challenge (its nonce differs).
    #[error("{0}")]
    WrongNonce(String),
    /// The quote covers other PCRs than those asked for.
    #[error("{0}")]
    WrongSelection(String),
    /// The values the host sent are not those the quote signed.
    #[error("{0}")]
    DigestMismatch(String),
    /// The EK certificate is missing, or is not the manufacturer's for
    /// this EK.
    #[error("{0}")]
    Certificate(String),
}

fn require(
    what: &str,
    attributes: u32,
    bit: u32,
    label: &str,
    set: bool,
) -> Result<(), VerifyError> {
    if (attributes & bit != 0) != set {
        let state = if set { "must be" } else { "may not be" };
        return Err(VerifyError::WrongKey(format!("the {what} {state} {label}")));
    }
    Ok(())
}

/// A host's endorsement key, read and checked: a restricted decryption key
/// of this TPM, ECC P-256 with AES-128-CFB (the TCG default template).
pub struct EndorsementKey {
    key: EccPublic,
}

impl EndorsementKey {
    /// Reads a marshalled `TPMT_PUBLIC`.
    pub fn read(public: &[u8]) -> Result<Self, VerifyError> {
        let what = "endorsement key";
        let key = read_ecc_public(what, public)?;
        for (bit, label, set) in [
            (FIXED_TPM, "fixed to its TPM", true),
            (FIXED_PARENT, "fixed to its parent", true),
            (RESTRICTED, "restricted", true),
            (DECRYPT, "a decryption key", true),
            (SIGN, "a signing key", false),
        ] {
            require(what, key.attributes, bit, label, set)?;
        }
        if key.symmetric != Some((ALG_AES, 128, ALG_CFB)) {
            return Err(VerifyError::WrongKey(
                "the endorsement key's symmetric algorithm is not AES-128-CFB (the TCG default ECC template)".into(),
            ));
        }
        Ok(Self { key })
    }

    /// Checks that `cert` (DER) is a certificate of this EK signed by one of
    /// `anchors` (DER certificates: the CAs that sign TPM manufacturers' EK
    /// certificates, intermediates included), both valid at `now_unix`, the
    /// signer a CA, and the certificate's key this EK. Returns the
    /// signer's subject.
    pub fn check_certificate(
        &self,
        cert: &[u8],
        anchors: &[Vec<u8>],
        now_unix: i64,
    ) -> Result<String, VerifyError> {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let bad = |m: String| VerifyError::Certificate(m);
        let (rest, leaf) = X509Certificate::from_der(cert)
            .map_err(|e| bad(format!("the EK certificate does not parse: {e}")))?;
        if !rest.is_empty() {
            return Err(bad("the EK certificate has bytes after its end".into()));
        }
        let key = p256::PublicKey::from_sec1_bytes(&leaf.public_key().subject_public_key.data)
            .map_err(|_| {
                bad("the EK certificate's key is not an ECC P-256 key (guestkey uses the TCG ECC P-256 EK)".into())
            })?;
        if key != self.key.point {
            return Err(bad(
                "the EK certificate is for another key than this TPM's endorsement key".into(),
            ));
        }
        let pool: Vec<X509Certificate<'_>> = anchors
            .iter()
            .filter_map(|a| X509Certificate::from_der(a).ok().map(|(_, c)| c))
            .collect();
        let when = x509_parser::time::ASN1Time::from_timestamp(now_unix)
            .map_err(|e| bad(format!("the time: {e}")))?;
        if !leaf.validity().is_valid_at(when) {
            return Err(bad(format!(
                "the EK certificate is not valid now (from {} to {})",
                leaf.validity().not_before,
                leaf.validity().not_after
            )));
        }
        let issuer = pool.iter().find(|c| {
            c.subject() == leaf.issuer() && leaf.verify_signature(Some(c.public_key())).is_ok()
        });
        let Some(issuer) = issuer else {
            return Err(bad(format!(
                "the EK certificate (issuer {}) is not signed by a CA of the EK CA file",
                leaf.issuer()
            )));
        };
        if !issuer.is_ca() {
            return Err(bad(format!(
                "{} signed the EK certificate but is not a CA",
                issuer.subject()
            )));
        }
        if !issuer.validity().is_valid_at(when) {
            return Err(bad(format!(
                "the EK CA {} is not valid now",
                issuer.subject()
            )));
        }
        Ok(issuer.subject().to_string())
    }

    /// The EK as a DER `SubjectPublicKeyInfo`: what its certificate holds.
    pub fn public_key_der(&self) -> Vec<u8> {
        use p256::pkcs8::EncodePublicKey;
        self.key
            .point
            .to_public_key_der()
            .map(|d| d.as_bytes().to_vec())
            .unwrap_or_default()
    }

    /// SHA-256 of its public area, hex: how the admin sees it.
    pub fn fingerprint(&self) -> String {
        hex::encode(&self.key.name[2..])
    }

    /// TPM2_MakeCredential: `credential` protected so that only the TPM
    /// holding this EK, with the key named `ak_name` loaded, recovers it.
    /// Returns the credential blob and the encrypted secret (the buffers
    /// of `TPM2B_ID_OBJECT` and `TPM2B_ENCRYPTED_SECRET`).
    pub fn make_credential(
        &self,
        ak_name: &[u8],
        credential: &[u8; 32],
    ) -> Result<(Vec<u8>, Vec<u8>), VerifyError> {
        // An ephemeral ECDH key against the EK: the seed is KDFe of the
        // shared x coordinate.
        let ephemeral = loop {
            let mut b = Zeroizing::new([0u8; 32]);
            getrandom::fill(&mut b[..])
                .map_err(|e| VerifyError::Malformed(format!("no random bytes: {e}")))?;
            if let Ok(k) = SecretKey::from_slice(&b[..]) {
                break k;
            }
        };
        let shared =
            p256::ecdh::diffie_hellman(ephemeral.to_nonzero_scalar(), self.key.point.as_affine());
        let point = ephemeral.public_key().to_encoded_point(false);
        let (ex, ey) = (
            point.x().expect("an uncompressed point has x"),
            point.y().expect("an uncompressed point has y"),
        );
        let seed = kdfe(
            &shared.raw_secret_bytes()[..],
            b"IDENTITY\0",
            ex,
            &self.key.x,
        );
        let sym = kdfa(&seed, b"STORAGE\0", ak_name, &[], 16);
        let hmac_key = kdfa(&seed, b"INTEGRITY\0", &[], &[], 32);
        // encIdentity: TPM2B_DIGEST(credential) in AES-128-CFB, zero IV.
        let mut identity = Vec::with_capacity(34);
        identity.extend_from_slice(&32u16.to_be_bytes());
        identity.extend_from_slice(credential);
        let key: [u8; 16] = sym[..16].try_into().expect("16 bytes");
        Encryptor::<Aes128>::new(&key.into(), &[0u8; 16].into()).encrypt(&mut identity);
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&hmac_key[..])
            .expect("HMAC takes any key length");
        mac.update(&identity);
        mac.update(ak_name);
        let outer = mac.finalize().into_bytes();
        let mut blob = Vec::with_capacity(2 + outer.len() + identity.len());
        blob.extend_from_slice(&(outer.len() as u16).to_be_bytes());
        blob.extend_from_slice(&outer);
        blob.extend_from_slice(&identity);
        let mut secret = Vec::with_capacity(68);
        for c in [ex, ey] {
            secret.extend_from_slice(&(c.len() as u16).to_be_bytes());
            secret.extend_from_slice(c);
        }
        Ok((blob, secret))
    }
}

/// KDFa (SP 800-108 counter mode, HMAC-SHA-256), `bytes` long.
fn kdfa(key: &[u8], label: &[u8], u: &[u8], v: &[u8], bytes: usize) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(bytes + 32));
    let mut i: u32 = 1;
    while out.len() < bytes {
        let mut mac =
            <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
        mac.update(&i.to_be_bytes());
        mac.update(label);
        mac.update(u);
        mac.update(v);
        mac.update(&((bytes * 8) as u32).to_be_bytes());
        out.extend_from_slice(&mac.finalize().into_bytes());
        i += 1;
    }
    out.truncate(bytes);
    out
}

/// KDFe (SP 800-56A concatenation, SHA-256): 32 bytes.
fn kdfe(z: &[u8], label: &[u8], u: &[u8], v: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut h = Sha256::new();
    h.update(1u32.to_be_bytes());
    h.update(z);
    h.update(label);
    h.update(u);
    h.update(v);
    Zeroizing::new(h.finalize().to_vec())
}

/// A host's attestation key, read and checked; what a verifier pins.
pub struct AttestationKeyPublic {
    key: EccPublic,
    verifying: VerifyingKey,
}

impl AttestationKeyPublic {
    /// Reads a marshalled `TPMT_PUBLIC` and checks that it is a key whose
    /// quotes can be trusted: restricted, fixed to its TPM and parent,
    /// made in the TPM, signing only, ECDSA with SHA-256.
    pub fn read(public: &[u8]) -> Result<Self, VerifyError> {
        let what = "attestation key";
        let key = read_ecc_public(what, public)?;
        for (bit, label, set) in [
            (FIXED_TPM, "fixed to its TPM", true),
            (FIXED_PARENT, "fixed to its parent", true),
            (SENSITIVE_DATA_ORIGIN, "made inside the TPM", true),
            (
                RESTRICTED,
                "restricted (the TPM signs only what it produced)",
                true,
            ),
            (SIGN, "a signing key", true),
            (DECRYPT, "a decryption key", false),
        ] {
            require(what, key.attributes, bit, label, set)?;
        }
        if key.scheme != Some((ALG_ECDSA, ALG_SHA256)) {
            return Err(VerifyError::WrongKey(
                "the attestation key's scheme is not ECDSA with SHA-256".into(),
            ));
        }
        let verifying = VerifyingKey::from(&key.point);
        Ok(Self { key, verifying })
    }

    /// Its TPM name (what MakeCredential binds the credential to).
    pub fn name(&self) -> &[u8] {
        &self.key.name
    }

    /// SHA-256 of its public area, hex.
    pub fn fingerprint(&self) -> String {
        hex::encode(&self.key.name[2..])
    }

    /// Checks `quote` (`TPMS_ATTEST`) and its `signature` (`TPMT_SIGNATURE`)
    /// against this key, the `nonce` sent, the `selection` asked for, and
    /// the `values` the host sent with it.
    pub fn check_quote(
        &self,
        nonce: &[u8],
        selection: &PcrSelection,
        quote: &[u8],
        signature: &[u8],
        values: &PcrValues,
    ) -> Result<QuoteFacts, VerifyError> {
        // The signature first: nothing else a quote says counts before it.
        let mut s = Reader::new("quote signature", signature);
        let alg = s.u16("algorithm")?;
        let hash = s.u16("hash")?;
        if alg != ALG_ECDSA || hash != ALG_SHA256 {
            return Err(VerifyError::BadSignature(format!(
                "the quote is signed with algorithm {alg:#06x}/{hash:#06x}, not ECDSA/SHA-256"
            )));
        }
        let r = pad32(s.sized("r", 32)?);
        let sv = pad32(s.sized("s", 32)?);
        s.end()?;
        let sig = EcdsaSignature::from_scalars(r, sv).map_err(|_| {
            VerifyError::BadSignature("the quote's signature is not a valid ECDSA signature".into())
        })?;
        self.verifying
            .verify_prehash(&Sha256::digest(quote), &sig)
            .map_err(|_| {
                VerifyError::BadSignature(
                    "the quote's signature does not verify with the host's attestation key".into(),
                )
            })?;

        let mut q = Reader::new("quote", quote);
        if q.u32("magic")? != GENERATED {
            return Err(VerifyError::Malformed(
                "the quote was not generated by a TPM (its magic is not TPM_GENERATED_VALUE)"
                    .into(),
            ));
        }
        if q.u16("type")? != ST_ATTEST_QUOTE {
            return Err(VerifyError::Malformed(
                "the attestation is not a quote".into(),
            ));
        }
        // The signer's qualified name: the signature above is what binds
        // the quote to the pinned key.
        q.sized("qualified signer", 66)?;
        let extra = q.sized("extra data", 64)?;
        let clock = q.u64("clock")?;
        let reset_count = q.u32("reset count")?;
        let restart_count = q.u32("restart count")?;
        let safe = q.u8("safe flag")? == 1;
        let _firmware = q.u64("firmware version")?;
        let banks = q.u32("PCR selection count")?;
        let mut selected = vec![];
        for _ in 0..banks {
            let hash = q.u16("PCR bank")?;
            let size = q.u8("PCR bitmap size")?;
            if size > 4 {
                return Err(VerifyError::Malformed(format!(
                    "the quote's PCR bitmap is {size} bytes: a TPM has at most 32 PCRs (4 bytes)"
                )));
            }
            let bitmap = q.take(usize::from(size), "PCR bitmap")?;
            for (i, byte) in bitmap.iter().enumerate() {
                for bit in 0..8 {
                    if byte & (1 << bit) != 0 {
                        // i < 4, bit < 8: the index is below 32.
                        selected.push((hash, (i * 8 + bit) as u8));
                    }
                }
            }
        }
        let digest = q.sized("PCR digest", 32)?;
        q.end()?;

        if extra != nonce {
            return Err(VerifyError::WrongNonce(
                "the quote does not carry this challenge's nonce (a replayed or foreign quote)"
                    .into(),
            ));
        }
        let asked: Vec<(u16, u8)> = selection.pcrs().iter().map(|p| (ALG_SHA256, *p)).collect();
        if selected != asked {
            return Err(VerifyError::WrongSelection(format!(
                "the quote covers other PCRs than the sha256:{selection} asked for"
            )));
        }
        if values.selection().ok().as_ref() != Some(selection) {
            return Err(VerifyError::WrongSelection(format!(
                "the host sent values of other PCRs than the sha256:{selection} asked for"
            )));
        }
        let mut h = Sha256::new();
        for (_, v) in values.iter() {
            h.update(v.0);
        }
        if h.finalize().as_slice() != digest {
            return Err(VerifyError::DigestMismatch(
                "the PCR values the host sent are not those its TPM signed (a PCR changed during the quote, or the values were altered)".into(),
            ));
        }
        Ok(QuoteFacts {
            clock,
            reset_count,
            restart_count,
            safe,
        })
    }
}

/// What a verified quote says of the TPM's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuoteFacts {
    /// Milliseconds the TPM has been powered since it was made (only goes
    /// forward, unless the owner clears it).
    pub clock: u64,
    /// TPM resets (reboots).
    pub reset_count: u32,
    /// TPM restarts (resumes) since the last reset.
    pub restart_count: u32,
    /// Whether `clock` was saved safely (never repeats a value).
    pub safe: bool,
}

impl QuoteFacts {
    /// Why this quote goes back in time from `earlier` (a replayed quote
    /// of an older boot, or a TPM whose state was rolled back), or None.
    pub fn goes_back_from(&self, earlier: &QuoteFacts) -> Option<String> {
        if self.reset_count < earlier.reset_count {
            return Some(format!(
                "the TPM's reset count went back from {} to {}",
                earlier.reset_count, self.reset_count
            ));
        }
        if self.reset_count > earlier.reset_count {
            // A new boot: after an unclean shutdown the clock restarts from
            // the last value the TPM saved, which may be older.
            return None;
        }
        if self.restart_count < earlier.restart_count {
            return Some(format!(
                "the TPM's restart count went back from {} to {} within one boot",
                earlier.restart_count, self.restart_count
            ));
        }
        if self.clock < earlier.clock {
            return Some(format!(
                "the TPM's clock went back from {} ms to {} ms",
                earlier.clock, self.clock
            ));
        }
        None
    }
}
