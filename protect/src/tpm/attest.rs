//! The host's side of remote attestation, on its TPM: the endorsement key
//! (EK, the TPM's identity, with the manufacturer's certificate where the
//! TPM has one), an attestation key (AK) made under it, the proof that both
//! live in this TPM (TPM2_ActivateCredential), and quotes.
//!
//! The EK is the TCG default ECC P-256 template (the same key every time
//! until the endorsement hierarchy is cleared). The AK is a restricted
//! ECDSA P-256 signing key under the EK: the TPM signs with it only what
//! it produced itself (quotes), never outside data, which is what makes a
//! quote worth checking. Its private part leaves the TPM only encrypted
//! under the EK, so the files holding it are useful to no other TPM.
//!
//! What the verifier does with these is in `verify.rs`, in software.

use tss_esapi::abstraction::{AsymmetricAlgorithmSelection, ak, ek};
use tss_esapi::attributes::SessionAttributesBuilder;
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{AuthHandle, KeyHandle, ObjectHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::{
    AsymmetricAlgorithm, HashingAlgorithm, SignatureSchemeAlgorithm,
};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Data, EncryptedSecret, IdObject, PcrSelectionListBuilder, PcrSlot, Private, Public,
    SignatureScheme, SymmetricDefinition,
};
use tss_esapi::traits::{Marshall, UnMarshall};
use zeroize::Zeroizing;

use crate::tpm::TpmError;
use crate::tpm::device::{Tpm, slot};
use crate::tpm::pcr::{PcrSelection, PcrValues};

/// The TPM's endorsement key, as a verifier receives it.
pub struct Endorsement {
    /// `TPMT_PUBLIC`, marshalled.
    pub public: Vec<u8>,
    /// The EK certificate (DER) from the TPM's NV memory, when it has one.
    pub certificate: Option<Vec<u8>>,
}

/// An attestation key made on this TPM.
pub struct AttestationKey {
    /// `TPMT_PUBLIC`, marshalled: what the verifier pins.
    pub public: Vec<u8>,
    /// `TPM2B_PRIVATE`'s buffer: encrypted by this TPM under its EK.
    pub private: Vec<u8>,
}

/// A quote and the values it covers.
pub struct Quote {
    /// `TPMS_ATTEST`, marshalled: what the AK signed.
    pub attest: Vec<u8>,
    /// `TPMT_SIGNATURE`, marshalled.
    pub signature: Vec<u8>,
    /// The PCR values read right after the quote (the verifier checks them
    /// against the quote's digest).
    pub values: PcrValues,
}

impl Tpm {
    fn endorsement_key(&mut self) -> Result<KeyHandle, TpmError> {
        ek::create_ek_object(&mut self.ctx, AsymmetricAlgorithm::Ecc, None)
            .map_err(|e| self.fail("create the endorsement key", e))
    }

    /// The EK's public part and its certificate, if the TPM has one.
    pub fn endorsement(&mut self) -> Result<Endorsement, TpmError> {
        let ek = self.endorsement_key()?;
        let public = self.ctx.read_public(ek);
        self.flush(ek.into());
        let (public, _, _) = public.map_err(|e| self.fail("read the endorsement key", e))?;
        let public = public
            .marshall()
            .map_err(|e| self.fail("marshal the endorsement key", e))?;
        // No certificate is not an error: a verifier decides what it needs.
        let certificate = ek::retrieve_ek_pubcert(
            &mut self.ctx,
            AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
        )
        .ok()
        .filter(|c| !c.is_empty());
        Ok(Endorsement {
            public,
            certificate,
        })
    }

    /// Makes a new attestation key under the EK.
    pub fn create_attestation_key(&mut self) -> Result<AttestationKey, TpmError> {
        let ek = self.endorsement_key()?;
        let made = ak::create_ak(
            &mut self.ctx,
            ek,
            HashingAlgorithm::Sha256,
            SignatureSchemeAlgorithm::EcDsa,
            None,
            None,
        );
        self.flush(ek.into());
        let made = made.map_err(|e| self.fail("create an attestation key", e))?;
        let public = made
            .out_public
            .marshall()
            .map_err(|e| self.fail("marshal the attestation key", e))?;
        Ok(AttestationKey {
            public,
            private: made.out_private.value().to_vec(),
        })
    }

    /// Loads `key` under the EK; returns both handles (flush both).
    fn load_attestation_key(
        &mut self,
        key: &AttestationKey,
    ) -> Result<(KeyHandle, KeyHandle), TpmError> {
        let public = Public::unmarshall(&key.public).map_err(|_| {
            TpmError::Corrupt("the attestation key's public part is damaged".into())
        })?;
        let private = Private::try_from(key.private.clone()).map_err(|_| {
            TpmError::Corrupt("the attestation key's private part is damaged".into())
        })?;
        let ek = self.endorsement_key()?;
        match ak::load_ak(&mut self.ctx, ek, None, private, public) {
            Ok(h) => Ok((ek, h)),
            Err(e) => {
                self.flush(ek.into());
                Err(TpmError::OtherTpm(format!(
                    "the TPM at `{}` cannot load this host's attestation key ({e}): it was made on another TPM, or this one's endorsement hierarchy was cleared; enroll the host again",
                    self.tcti()
                )))
            }
        }
    }

    /// TPM2_ActivateCredential: the secret a verifier encrypted to the EK
    /// for the AK named in it. The TPM releases it only when the AK is
    /// loaded in this TPM, under this EK.
    pub fn activate_credential(
        &mut self,
        key: &AttestationKey,
        credential_blob: &[u8],
        encrypted_secret: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, TpmError> {
        let blob = IdObject::try_from(credential_blob.to_vec())
            .map_err(|_| TpmError::Corrupt("the credential blob is too long".into()))?;
        let secret = EncryptedSecret::try_from(encrypted_secret.to_vec())
            .map_err(|_| TpmError::Corrupt("the encrypted secret is too long".into()))?;
        let (ek, akh) = self.load_attestation_key(key)?;
        let r = self.activate_loaded(ek, akh, blob, secret);
        self.flush(akh.into());
        self.flush(ek.into());
        r
    }

    fn activate_loaded(
        &mut self,
        ek: KeyHandle,
        akh: KeyHandle,
        blob: IdObject,
        secret: EncryptedSecret,
    ) -> Result<Zeroizing<Vec<u8>>, TpmError> {
        // The EK's policy: PolicySecret(TPM_RH_ENDORSEMENT).
        let session = self
            .ctx
            .start_auth_session(
                None,
                None,
                None,
                SessionType::Policy,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(|e| self.fail("start a policy session", e))?
            .ok_or_else(|| TpmError::Device("the TPM returned no session".into()))?;
        let (attrs, mask) = SessionAttributesBuilder::new()
            .with_decrypt(true)
            .with_encrypt(true)
            .build();
        let r = self
            .ctx
            .tr_sess_set_attributes(session, attrs, mask)
            .and_then(|()| {
                let policy = PolicySession::try_from(session)?;
                self.ctx.execute_with_nullauth_session(|ctx| {
                    ctx.policy_secret(
                        policy,
                        AuthHandle::Endorsement,
                        Default::default(),
                        Default::default(),
                        Default::default(),
                        None,
                    )
                })?;
                self.ctx.execute_with_sessions(
                    (Some(AuthSession::Password), Some(session), None),
                    |ctx| ctx.activate_credential(akh, ek, blob, secret),
                )
            });
        self.flush(ObjectHandle::from(SessionHandle::from(session)));
        match r {
            Ok(d) => Ok(Zeroizing::new(d.value().to_vec())),
            Err(e) => Err(self.fail(
                "activate the credential (it was made for another TPM or another attestation key)",
                e,
            )),
        }
    }

    /// A quote over `selection` (SHA-256 bank) with `nonce` as its
    /// qualifying data, signed by `key`, and the values it covers.
    pub fn quote(
        &mut self,
        key: &AttestationKey,
        nonce: &[u8],
        selection: &PcrSelection,
    ) -> Result<Quote, TpmError> {
        let data = Data::try_from(nonce.to_vec())
            .map_err(|_| TpmError::Config("the nonce is longer than 64 bytes".into()))?;
        let slots: Vec<PcrSlot> = selection.pcrs().iter().map(|p| slot(*p)).collect();
        let list = PcrSelectionListBuilder::new()
            .with_selection(HashingAlgorithm::Sha256, &slots)
            .build()
            .map_err(|e| self.fail("select PCRs", e))?;
        let (ek, akh) = self.load_attestation_key(key)?;
        let r = self
            .ctx
            .execute_with_nullauth_session(|ctx| ctx.quote(akh, data, SignatureScheme::Null, list));
        self.flush(akh.into());
        self.flush(ek.into());
        let (attest, signature) = r.map_err(|e| self.fail("quote the PCRs", e))?;
        let values = self.pcr_values(selection)?;
        Ok(Quote {
            attest: attest
                .marshall()
                .map_err(|e| self.fail("marshal the quote", e))?,
            signature: signature
                .marshall()
                .map_err(|e| self.fail("marshal the quote's signature", e))?,
            values,
        })
    }
}
