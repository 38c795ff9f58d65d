//! The TPM itself, through `tss-esapi`: the storage primary key, PCR reads,
//! random bytes, and sealing and unsealing under TPM2_PolicyAuthorize.
//!
//! Every call runs on the process's TPM thread with a deadline
//! ([`crate::tpm::with_tpm`], in `service.rs`). Every handle is flushed
//! before the call returns (TPMs have few transient slots).
//!
//! Sessions that carry a key are salted with the primary key and encrypt
//! it (`decrypt` when sealing, `encrypt` when unsealing), so the key does
//! not cross the bus to the TPM in the clear.

use std::str::FromStr;

use tss_esapi::Context;
use tss_esapi::attributes::{ObjectAttributesBuilder, SessionAttributesBuilder};
use tss_esapi::constants::SessionType;
use tss_esapi::constants::response_code::Tss2ResponseCodeKind;
use tss_esapi::handles::{KeyHandle, ObjectHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Digest, EccParameter, EccPoint, EccScheme, EccSignature, KeyDerivationFunctionScheme,
    KeyedHashScheme, Name, Nonce, PcrSelectionListBuilder, PcrSlot, Private, Public, PublicBuilder,
    PublicEccParametersBuilder, PublicKeyedHashParameters, SensitiveData, Signature,
    SymmetricDefinition, SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::{Marshall, UnMarshall};
use zeroize::Zeroizing;

use crate::ProtectedKey;

use crate::tpm::TpmError;
use crate::tpm::authority::{Approval, AuthorityPublic, POLICY_REF};
use crate::tpm::pcr::{
    PcrSelection, PcrValue, PcrValues, approval_digest, policy_authorize_digest,
};

/// An open TPM.
pub struct Tpm {
    pub(super) ctx: Context,
    tcti: String,
}

/// What sealing leaves to store: the sealed object, which only this TPM
/// can load.
pub struct SealedObject {
    /// `TPM2B_PUBLIC` marshalled.
    pub public: Vec<u8>,
    /// `TPM2B_PRIVATE`: encrypted by the TPM under the primary key.
    pub private: Vec<u8>,
}

impl Tpm {
    /// Opens the TPM at `tcti` (`device:/dev/tpmrm0`,
    /// `swtpm:host=127.0.0.1,port=2321`, ...).
    pub fn open(tcti: &str) -> Result<Self, TpmError> {
        let conf = TctiNameConf::from_str(tcti).map_err(|_| {
            TpmError::Config(format!(
                "`{tcti}` is not a TCTI: use device:/dev/tpmrm0 or swtpm:host=HOST,port=PORT"
            ))
        })?;
        let ctx = Context::new(conf).map_err(|e| {
            TpmError::Unreachable(format!(
                "cannot open the TPM at TCTI `{tcti}` ({e}): check that it exists and that this user may use it"
            ))
        })?;
        Ok(Self {
            ctx,
            tcti: tcti.to_owned(),
        })
    }

    /// The TCTI it was opened with.
    pub fn tcti(&self) -> &str {
        &self.tcti
    }

    pub(super) fn fail(&self, what: &str, e: tss_esapi::Error) -> TpmError {
        describe(&self.tcti, what, e)
    }

    /// `n` random bytes from the TPM's generator.
    pub fn random(&mut self, out: &mut [u8]) -> Result<(), TpmError> {
        let mut filled = 0;
        while filled < out.len() {
            let want = (out.len() - filled).min(32);
            let d = self
                .ctx
                .get_random(want)
                .map_err(|e| describe(&self.tcti, "get random bytes", e))?;
            let got = d.value();
            if got.is_empty() {
                return Err(TpmError::Device("the TPM returned no random bytes".into()));
            }
            let n = got.len().min(want);
            out[filled..filled + n].copy_from_slice(&got[..n]);
            filled += n;
        }
        Ok(())
    }

    /// The current SHA-256 values of `selection`.
    pub fn pcr_values(&mut self, selection: &PcrSelection) -> Result<PcrValues, TpmError> {
        let mut values = std::collections::BTreeMap::new();
        // PCR_Read answers at most 8 digests per call.
        for chunk in selection.pcrs().chunks(8) {
            let slots: Vec<PcrSlot> = chunk.iter().map(|p| slot(*p)).collect();
            let list = PcrSelectionListBuilder::new()
                .with_selection(HashingAlgorithm::Sha256, &slots)
                .build()
                .map_err(|e| self.fail("select PCRs", e))?;
            let (_, read, digests) = self
                .ctx
                .pcr_read(list)
                .map_err(|e| describe(&self.tcti, "read PCRs", e))?;
            let read_pcrs: Vec<u8> = read
                .get_selections()
                .iter()
                .flat_map(|s| s.selected())
                .map(|s| u32::from(s).trailing_zeros() as u8)
                .collect();
            if read_pcrs.len() != digests.len() || read_pcrs.len() != chunk.len() {
                return Err(TpmError::Device(format!(
                    "the TPM has no SHA-256 bank for PCRs {chunk:?} (it read {read_pcrs:?})"
                )));
            }
            for (p, d) in read_pcrs.iter().zip(digests.value()) {
                let v: [u8; 32] = d
                    .value()
                    .try_into()
                    .map_err(|_| TpmError::Device(format!("PCR {p} is not a SHA-256 value")))?;
                values.insert(*p, PcrValue(v));
            }
        }
        Ok(PcrValues::new(values))
    }

    /// The storage primary key (ECC P-256, the TCG template): the same key
    /// every time on this TPM until its owner hierarchy is cleared.
    fn primary(&mut self) -> Result<KeyHandle, TpmError> {
        let attrs = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_sensitive_data_origin(true)
            .with_user_with_auth(true)
            .with_decrypt(true)
            .with_restricted(true)
            .with_no_da(true)
            .build()
            .map_err(|e| self.fail("build the primary template", e))?;
        let public = PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::Ecc)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attrs)
            .with_ecc_parameters(
                PublicEccParametersBuilder::new()
                    .with_symmetric(SymmetricDefinitionObject::AES_128_CFB)
                    .with_ecc_scheme(EccScheme::Null)
                    .with_curve(EccCurve::NistP256)
                    .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
                    .with_is_decryption_key(true)
                    .with_restricted(true)
                    .build()
                    .map_err(|e| self.fail("build the primary template", e))?,
            )
            .with_ecc_unique_identifier(EccPoint::default())
            .build()
            .map_err(|e| self.fail("build the primary template", e))?;
        let r = self
            .ctx
            .execute_with_nullauth_session(|ctx| {
                ctx.create_primary(Hierarchy::Owner, public, None, None, None, None)
            })
            .map_err(|e| self.fail("create the storage primary key", e))?;
        Ok(r.key_handle)
    }

    /// Loads the public authority key; its name is what the sealed object's
    /// policy names.
    fn load_authority(&mut self, a: &AuthorityPublic) -> Result<(KeyHandle, Name), TpmError> {
        let attrs = ObjectAttributesBuilder::new()
            .with_user_with_auth(true)
            .with_sign_encrypt(true)
            .build()
            .map_err(|e| self.fail("build the authority template", e))?;
        let x = EccParameter::try_from(a.x.clone())
            .map_err(|e| self.fail("read the authority key", e))?;
        let y = EccParameter::try_from(a.y.clone())
            .map_err(|e| self.fail("read the authority key", e))?;
        let public = PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::Ecc)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attrs)
            .with_ecc_parameters(
                PublicEccParametersBuilder::new_unrestricted_signing_key(
                    EccScheme::EcDsa(tss_esapi::structures::HashScheme::new(
                        HashingAlgorithm::Sha256,
                    )),
                    EccCurve::NistP256,
                )
                .build()
                .map_err(|e| self.fail("build the authority template", e))?,
            )
            .with_ecc_unique_identifier(EccPoint::new(x, y))
            .build()
            .map_err(|e| self.fail("build the authority template", e))?;
        let h = self
            .ctx
            .load_external_public(public, Hierarchy::Owner)
            .map_err(|e| {
                TpmError::Authority(format!(
                    "the TPM refused the PCR authority key {}: {e}",
                    a.fingerprint()
                ))
            })?;
        let name = match self.ctx.tr_get_name(h.into()) {
            Ok(n) => n,
            Err(e) => {
                self.flush(h.into());
                return Err(self.fail("name the authority key", e));
            }
        };
        Ok((h, name))
    }

    pub(super) fn flush(&mut self, h: ObjectHandle) {
        let _ = self.ctx.flush_context(h);
    }

    /// A session salted with the primary key that protects the first
    /// parameter of a command (`decrypt`) or of its response (`encrypt`).
    fn salted(
        &mut self,
        primary: KeyHandle,
        kind: SessionType,
        decrypt: bool,
        encrypt: bool,
    ) -> Result<AuthSession, TpmError> {
        let s = self
            .ctx
            .start_auth_session(
                Some(primary),
                None,
                None,
                kind,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(|e| self.fail("start a session", e))?
            .ok_or_else(|| TpmError::Device("the TPM returned no session".into()))?;
        let (attrs, mask) = SessionAttributesBuilder::new()
            .with_decrypt(decrypt)
            .with_encrypt(encrypt)
            .with_continue_session(true)
            .build();
        if let Err(e) = self.ctx.tr_sess_set_attributes(s, attrs, mask) {
            self.flush(ObjectHandle::from(tss_esapi::handles::SessionHandle::from(
                s,
            )));
            return Err(self.fail("set session attributes", e));
        }
        Ok(s)
    }

    fn end_session(&mut self, s: AuthSession) {
        self.flush(ObjectHandle::from(tss_esapi::handles::SessionHandle::from(
            s,
        )));
    }

    /// Seals `secret` (at most 128 bytes) to this TPM under a policy that
    /// accepts any PCR policy `authority` signs.
    pub fn seal(
        &mut self,
        secret: &ProtectedKey,
        authority: &AuthorityPublic,
    ) -> Result<SealedObject, TpmError> {
        let (auth_h, name) = self.load_authority(authority)?;
        self.flush(auth_h.into());
        let policy = policy_authorize_digest(name.value(), POLICY_REF);
        let attrs = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_no_da(true)
            .with_admin_with_policy(true)
            .build()
            .map_err(|e| self.fail("build the sealed object template", e))?;
        let public = PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::KeyedHash)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attrs)
            .with_auth_policy(
                Digest::try_from(policy.to_vec())
                    .map_err(|e| self.fail("set the sealed object's policy", e))?,
            )
            .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
            .with_keyed_hash_unique_identifier(Digest::default())
            .build()
            .map_err(|e| self.fail("build the sealed object template", e))?;
        let data = SensitiveData::try_from(secret.expose_secret().to_vec())
            .map_err(|e| self.fail("pass the key to seal", e))?;
        let primary = self.primary()?;
        let session = match self.salted(primary, SessionType::Hmac, true, false) {
            Ok(s) => s,
            Err(e) => {
                self.flush(primary.into());
                return Err(e);
            }
        };
        let r = self.ctx.execute_with_session(Some(session), |ctx| {
            ctx.create(primary, public, None, Some(data), None, None)
        });
        self.end_session(session);
        self.flush(primary.into());
        let r = r.map_err(|e| self.fail("seal the key", e))?;
        let public = r
            .out_public
            .marshall()
            .map_err(|e| self.fail("store the sealed object", e))?;
        Ok(SealedObject {
            public,
            private: r.out_private.value().to_vec(),
        })
    }

    /// Unseals `sealed` with `approval`: the TPM checks that the PCRs have
    /// the approved values and that the authority signed them.
    pub fn unseal(
        &mut self,
        sealed: &SealedObject,
        authority: &AuthorityPublic,
        approval: &Approval,
    ) -> Result<ProtectedKey, TpmError> {
        let public = Public::unmarshall(&sealed.public).map_err(|_| {
            TpmError::Corrupt("the sealed object's public part does not parse".into())
        })?;
        let private = Private::try_from(sealed.private.clone()).map_err(|_| {
            TpmError::Corrupt("the sealed object's private part is too long".into())
        })?;
        let primary = self.primary()?;
        let loaded = self
            .ctx
            .execute_with_nullauth_session(|ctx| ctx.load(primary, private, public));
        let item = match loaded {
            Ok(h) => h,
            Err(e) => {
                self.flush(primary.into());
                return Err(match kind(&e) {
                    Some(Tss2ResponseCodeKind::Integrity)
                    | Some(Tss2ResponseCodeKind::Value)
                    | Some(Tss2ResponseCodeKind::Size) => TpmError::OtherTpm(format!(
                        "this TPM ({}) cannot load the sealed key: it was sealed by another TPM, or this TPM was cleared since",
                        self.tcti
                    )),
                    _ => self.fail("load the sealed key", e),
                });
            }
        };
        let result = self.authorize_and_unseal(primary, item, authority, approval);
        self.flush(item.into());
        self.flush(primary.into());
        result
    }

    fn authorize_and_unseal(
        &mut self,
        primary: KeyHandle,
        item: KeyHandle,
        authority: &AuthorityPublic,
        approval: &Approval,
    ) -> Result<ProtectedKey, TpmError> {
        let approved = approval.values.policy_digest().map_err(TpmError::Corrupt)?;
        let (auth_h, name) = self.load_authority(authority)?;
        let digest = approval_digest(&approved, POLICY_REF);
        let sig = EccSignature::create(
            HashingAlgorithm::Sha256,
            EccParameter::try_from(approval.r.clone())
                .map_err(|_| TpmError::Corrupt("an approval's signature is malformed".into()))?,
            EccParameter::try_from(approval.s.clone())
                .map_err(|_| TpmError::Corrupt("an approval's signature is malformed".into()))?,
        )
        .map_err(|e| self.fail("read an approval's signature", e))?;
        let ticket = self.ctx.verify_signature(
            auth_h,
            Digest::try_from(digest.to_vec()).map_err(|e| self.fail("hash an approval", e))?,
            Signature::EcDsa(sig),
        );
        self.flush(auth_h.into());
        let ticket = ticket.map_err(|e| match kind(&e) {
            Some(Tss2ResponseCodeKind::Signature) => TpmError::BadApproval(
                "the approval's signature does not verify with the PCR authority key".into(),
            ),
            _ => self.fail("verify an approval", e),
        })?;
        let session = self.salted(primary, SessionType::Policy, false, true)?;
        let policy =
            PolicySession::try_from(session).map_err(|e| self.fail("start a policy session", e))?;
        let selection = approval.values.selection().map_err(TpmError::Corrupt)?;
        let slots: Vec<PcrSlot> = selection.pcrs().iter().map(|p| slot(*p)).collect();
        let steps = (|| {
            let list = PcrSelectionListBuilder::new()
                .with_selection(HashingAlgorithm::Sha256, &slots)
                .build()?;
            self.ctx.policy_pcr(policy, Digest::default(), list)?;
            self.ctx.policy_authorize(
                policy,
                Digest::try_from(approved.to_vec())?,
                Nonce::try_from(POLICY_REF.to_vec())?,
                &name,
                ticket,
            )
        })();
        if let Err(e) = steps {
            self.end_session(session);
            return Err(match kind(&e) {
                Some(Tss2ResponseCodeKind::Value) | Some(Tss2ResponseCodeKind::PolicyFail) => {
                    TpmError::PcrMismatch(
                        "the PCRs changed between reading and unsealing: try again".into(),
                    )
                }
                _ => self.fail("satisfy the sealed key's policy", e),
            });
        }
        let out = self
            .ctx
            .execute_with_session(Some(session), |ctx| ctx.unseal(item.into()));
        self.end_session(session);
        let data = out.map_err(|e| match kind(&e) {
            Some(Tss2ResponseCodeKind::PolicyFail) => TpmError::PcrMismatch(
                "the TPM refused the approved policy: the PCRs do not have the approved values"
                    .into(),
            ),
            _ => self.fail("unseal the key", e),
        })?;
        let bytes = Zeroizing::new(data.value().to_vec());
        Ok(ProtectedKey::copy_from_secret_slice(&bytes))
    }
}

pub(super) fn slot(pcr: u8) -> PcrSlot {
    PcrSlot::try_from(1u32 << pcr).expect("PCR selections hold 0 to 23 only")
}

fn kind(e: &tss_esapi::Error) -> Option<Tss2ResponseCodeKind> {
    match e {
        tss_esapi::Error::Tss2Error(rc) => rc.kind(),
        tss_esapi::Error::WrapperError(_) => None,
    }
}

/// A TPM error as an operator reads it: what failed, the TPM's reason, and
/// for the known states what to do.
fn describe(tcti: &str, what: &str, e: tss_esapi::Error) -> TpmError {
    match kind(&e) {
        Some(Tss2ResponseCodeKind::Lockout) => TpmError::Lockout(format!(
            "the TPM at `{tcti}` is in dictionary-attack lockout and refused to {what}: wait for the lockout to expire or reset it with the lockout authorization (`tpm2_dictionarylockout --clear-lockout`)"
        )),
        Some(Tss2ResponseCodeKind::Initialize) => TpmError::Device(format!(
            "the TPM at `{tcti}` was not started (TPM2_Startup) and could not {what}: start it (the firmware or `tpm2_startup -c`)"
        )),
        Some(Tss2ResponseCodeKind::ObjectMemory) | Some(Tss2ResponseCodeKind::SessionMemory) => {
            TpmError::Device(format!(
                "the TPM at `{tcti}` has no free object or session slot and could not {what}: other programs left objects loaded (use the resource manager, device:/dev/tpmrm0, or flush them with `tpm2_flushcontext -t`)"
            ))
        }
        Some(Tss2ResponseCodeKind::Retry)
        | Some(Tss2ResponseCodeKind::Yielded)
        | Some(Tss2ResponseCodeKind::Testing) => TpmError::Device(format!(
            "the TPM at `{tcti}` is busy and could not {what}: try again"
        )),
        _ => TpmError::Device(format!("the TPM at `{tcti}` could not {what}: {e}")),
    }
}
