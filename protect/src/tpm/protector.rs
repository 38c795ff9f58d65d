//! [`TpmProtector`]: a key kept in a file that only this machine's TPM can
//! open, and only while its PCRs have values the PCR authority approved.
//!
//! The file holds a sealed object (a random 32-byte wrapping key sealed by
//! the TPM under TPM2_PolicyAuthorize naming the authority) and the key
//! itself encrypted under that wrapping key (XChaCha20-Poly1305), so keys of
//! any size (a PEM CA key) are protected the same way. Approvals (signed PCR
//! values) are kept in a file beside it, shared by every key of the machine.

use std::path::{Path, PathBuf};

use crate::{Encoding, FileProtector, KeyProtector, ProtectError, ProtectedKey};
use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::tpm::authority::{Approval, Approvals, AuthorityPublic};
use crate::tpm::device::{SealedObject, Tpm};
use crate::tpm::pcr::{PcrSelection, PcrValues};
use crate::tpm::service::{DEADLINE, with_tpm};
use crate::tpm::{TpmError, entropy};

const FORMAT: &str = "guestkey-tpm-sealed/1";
const AAD: &[u8] = b"guestkey TPM-wrapped key v1";

/// The sealed-key file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SealedFile {
    format: String,
    /// The authority whose approvals open it.
    authority: AuthorityPublic,
    /// The PCRs it was sealed for (approvals name their own; this is what
    /// `reseal` and status show).
    pcrs: PcrSelection,
    #[serde(with = "hex::serde")]
    public: Vec<u8>,
    #[serde(with = "hex::serde")]
    private: Vec<u8>,
    /// Nonce, ciphertext and tag of the key under the unsealed wrapping key.
    #[serde(with = "hex::serde")]
    wrapped: Vec<u8>,
}

/// A key sealed to the TPM at `tcti`, in `blob`, opened with the approvals
/// in `approvals`.
#[derive(Debug, Clone)]
pub struct TpmProtector {
    blob: PathBuf,
    approvals: PathBuf,
    tcti: String,
    /// For sealing a new key: the authority and PCRs to seal to.
    seal_to: Option<(AuthorityPublic, PcrSelection)>,
    /// The command that approves the current PCR values, for messages.
    approve_hint: String,
    /// How long one TPM operation may take.
    deadline: std::time::Duration,
}

/// What `status` shows about a sealed key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SealedStatus {
    /// The sealed-key file.
    pub blob: PathBuf,
    /// The TCTI.
    pub tcti: String,
    /// The PCRs it was sealed for.
    pub pcrs: String,
    /// The authority's fingerprint.
    pub authority: String,
    /// The current values of those PCRs.
    pub current: PcrValues,
    /// How many approvals of this authority are kept.
    pub approvals: usize,
    /// Whether one of them matches the current values (it would unseal).
    pub unseals: bool,
}

impl TpmProtector {
    /// The key in `blob`, with approvals in `approvals`, on the TPM at
    /// `tcti`; `approve_hint` is the command an operator runs to approve the
    /// current PCR values (named in errors).
    pub fn new(
        blob: impl Into<PathBuf>,
        approvals: impl Into<PathBuf>,
        tcti: &str,
        approve_hint: &str,
    ) -> Self {
        Self {
            blob: blob.into(),
            approvals: approvals.into(),
            tcti: tcti.to_owned(),
            seal_to: None,
            approve_hint: approve_hint.to_owned(),
            deadline: DEADLINE,
        }
    }

    /// New keys are sealed to `authority`, and described as bound to `pcrs`.
    pub fn sealing_to(mut self, authority: AuthorityPublic, pcrs: PcrSelection) -> Self {
        self.seal_to = Some((authority, pcrs));
        self
    }

    /// TPM operations that take longer than `d` fail (default [`DEADLINE`]).
    pub fn with_deadline(mut self, d: std::time::Duration) -> Self {
        self.deadline = d;
        self
    }

    /// The sealed-key file.
    pub fn blob(&self) -> &Path {
        &self.blob
    }

    fn file(&self) -> FileProtector {
        FileProtector::new(&self.blob, Encoding::Raw)
    }

    fn read(&self) -> Result<SealedFile, TpmError> {
        let bytes = self.file().unseal()?;
        let f: SealedFile = serde_json::from_slice(bytes.expose_secret()).map_err(|e| {
            TpmError::Corrupt(format!(
                "{} is not a TPM-sealed key: {e}",
                self.blob.display()
            ))
        })?;
        if f.format != FORMAT {
            return Err(TpmError::Corrupt(format!(
                "{} is a sealed key of format `{}`, this version reads `{FORMAT}`",
                self.blob.display(),
                f.format
            )));
        }
        Ok(f)
    }

    /// The sealed file of `key`, sealed to this protector's authority.
    fn seal(&self, key: &ProtectedKey) -> Result<ProtectedKey, TpmError> {
        let (authority, pcrs) = self.seal_to.clone().ok_or_else(|| {
            TpmError::Config(format!(
                "{}: no PCR authority to seal a new key to",
                self.blob.display()
            ))
        })?;
        let tcti = self.tcti.clone();
        let auth = authority.clone();
        let (kek, sealed) = with_tpm(&tcti, self.deadline, move |tpm| {
            let kek = entropy::key_with(Some(tpm), 32)?;
            let sealed = tpm.seal(&kek, &auth)?;
            Ok((kek, sealed))
        })?;
        let mut wrapped = vec![0u8; 24];
        getrandom::fill(&mut wrapped).map_err(|e| TpmError::Io(format!("no random nonce: {e}")))?;
        let nonce = XNonce::try_from(&wrapped[..24]).expect("24 bytes");
        let mut body = Zeroizing::new(key.expose_secret().to_vec());
        let tag = XChaCha20Poly1305::new_from_slice(kek.expose_secret())
            .map_err(|_| TpmError::Device("the unsealed wrapping key is not 32 bytes".into()))?
            .encrypt_inout_detached(&nonce, AAD, body.as_mut_slice().into())
            .map_err(|_| TpmError::Io("cannot wrap the key".into()))?;
        wrapped.extend_from_slice(&body);
        wrapped.extend_from_slice(&tag);
        let f = SealedFile {
            format: FORMAT.into(),
            authority,
            pcrs,
            public: sealed.public,
            private: sealed.private,
            wrapped,
        };
        let text = serde_json::to_vec_pretty(&f).expect("sealed file serializes");
        Ok(ProtectedKey::copy_from_secret_slice(&text))
    }

    /// The approvals of `authority`.
    fn approvals_of(&self, authority: &AuthorityPublic) -> Result<Vec<Approval>, TpmError> {
        let fp = authority.fingerprint();
        Ok(Approvals::load(&self.approvals)?
            .approvals
            .into_iter()
            .filter(|a| a.authority == fp)
            .collect())
    }

    /// Where it stands: PCRs, their current values, whether it unseals.
    pub fn status(&self) -> Result<SealedStatus, TpmError> {
        let f = self.read()?;
        let approvals = self.approvals_of(&f.authority)?;
        let pcrs = f.pcrs.clone();
        let current = with_tpm(&self.tcti, self.deadline, move |t| t.pcr_values(&pcrs))?;
        let tcti = self.tcti.clone();
        let unseals = match pick(&approvals, &tcti, self.deadline)? {
            Picked::Match(_) => true,
            Picked::Closest { .. } | Picked::None => false,
        };
        Ok(SealedStatus {
            blob: self.blob.clone(),
            tcti: self.tcti.clone(),
            pcrs: f.pcrs.to_string(),
            authority: f.authority.fingerprint(),
            current,
            approvals: approvals.len(),
            unseals,
        })
    }

    fn open(&self) -> Result<ProtectedKey, TpmError> {
        let f = self.read()?;
        let approvals = self.approvals_of(&f.authority)?;
        let approval = match pick(&approvals, &self.tcti, self.deadline)? {
            Picked::Match(a) => a,
            Picked::None => {
                return Err(TpmError::PcrMismatch(format!(
                    "{} has no PCR approval of authority {} in {}: approve this machine's PCR values with `{}`",
                    self.blob.display(),
                    f.authority.fingerprint(),
                    self.approvals.display(),
                    self.approve_hint
                )));
            }
            Picked::Closest { approval, current } => {
                let differ = approval.values.differences(&current);
                let list = differ
                    .iter()
                    .map(|p| {
                        format!(
                            "PCR {p} is {} (approved: {})",
                            current.get(*p).map_or("unread".into(), |v| v.to_string()),
                            approval
                                .values
                                .get(*p)
                                .map_or("-".into(), |v| v.to_string())
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ");
                return Err(TpmError::PcrMismatch(format!(
                    "the TPM will not unseal {}: no approved PCR policy matches this boot: {list}. If this boot is an approved update, approve its values with `{}`",
                    self.blob.display(),
                    self.approve_hint
                )));
            }
        };
        let sealed = SealedObject {
            public: f.public.clone(),
            private: f.private.clone(),
        };
        let authority = f.authority.clone();
        let kek = with_tpm(&self.tcti, self.deadline, move |t| {
            t.unseal(&sealed, &authority, &approval)
        })?;
        let w = &f.wrapped;
        if w.len() < 24 + 16 {
            return Err(TpmError::Corrupt(format!(
                "{}: the wrapped key is cut short",
                self.blob.display()
            )));
        }
        let nonce = XNonce::try_from(&w[..24]).expect("24 bytes");
        let tag = Tag::try_from(&w[w.len() - 16..]).expect("16 bytes");
        let mut body = Zeroizing::new(w[24..w.len() - 16].to_vec());
        XChaCha20Poly1305::new_from_slice(kek.expose_secret())
            .map_err(|_| TpmError::Corrupt("the unsealed wrapping key is not 32 bytes".into()))?
            .decrypt_inout_detached(&nonce, AAD, body.as_mut_slice().into(), &tag)
            .map_err(|_| {
                TpmError::Corrupt(format!(
                    "{}: the wrapped key does not open with the unsealed key (the file was altered)",
                    self.blob.display()
                ))
            })?;
        Ok(ProtectedKey::copy_from_secret_slice(&body))
    }
}

enum Picked {
    /// An approval that matches the current PCR values.
    Match(Approval),
    /// None matches: the one with the fewest differing PCRs, and the
    /// current values of its PCRs.
    Closest {
        approval: Approval,
        current: PcrValues,
    },
    /// There are no approvals.
    None,
}

/// The approval whose PCR values this TPM has now.
fn pick(
    approvals: &[Approval],
    tcti: &str,
    deadline: std::time::Duration,
) -> Result<Picked, TpmError> {
    if approvals.is_empty() {
        return Ok(Picked::None);
    }
    let list = approvals.to_vec();
    with_tpm(tcti, deadline, move |t: &mut Tpm| {
        let mut closest: Option<(usize, Approval, PcrValues)> = None;
        // Newest first: the approval of the latest update usually matches.
        for a in list.into_iter().rev() {
            let sel = a.values.selection().map_err(TpmError::Corrupt)?;
            let now = t.pcr_values(&sel)?;
            let d = a.values.differences(&now).len();
            if d == 0 {
                return Ok(Picked::Match(a));
            }
            if closest.as_ref().is_none_or(|(n, _, _)| d < *n) {
                closest = Some((d, a, now));
            }
        }
        let (_, approval, current) = closest.expect("approvals is not empty");
        Ok(Picked::Closest { approval, current })
    })
}

impl KeyProtector for TpmProtector {
    fn describe(&self) -> String {
        format!("tpm {} (TCTI {})", self.blob.display(), self.tcti)
    }

    fn exists(&self) -> Result<bool, ProtectError> {
        self.file().exists()
    }

    fn create(&self, key: &ProtectedKey) -> Result<(), ProtectError> {
        if self.file().exists()? {
            return Err(ProtectError::Exists(self.blob.display().to_string()));
        }
        let sealed = self.seal(key)?;
        self.file().create(&sealed)
    }

    fn replace(&self, key: &ProtectedKey) -> Result<(), ProtectError> {
        let sealed = self.seal(key)?;
        self.file().replace(&sealed)
    }

    fn unseal(&self) -> Result<ProtectedKey, ProtectError> {
        Ok(self.open()?)
    }
}

/// The TPM settings of a directory of sealed keys (`site.json` beside
/// them): which TPM, which PCRs, which authority, and the command that
/// approves PCR values. Written once by whoever seals the first key (`init
/// --master-key-source tpm`, `guestkeyd enroll --tpm`), read by every
/// `tpm:PATH` key source in that directory. Not secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TpmSite {
    /// The TCTI (`device:/dev/tpmrm0`, `swtpm:host=...,port=...`).
    pub tcti: String,
    /// The PCRs new keys are sealed for.
    pub pcrs: PcrSelection,
    /// The PCR authority whose approvals open the keys.
    pub authority: AuthorityPublic,
    /// The command that approves this machine's current PCR values.
    pub approve_hint: String,
}

/// The file of a [`TpmSite`] in its directory.
pub const SITE_FILE: &str = "site.json";
/// The approvals file in a site's directory.
pub const APPROVALS_FILE: &str = "approvals.json";

impl TpmSite {
    /// The site of the sealed keys in `dir`. `GUESTKEY_TPM_TCTI`, when set,
    /// names the TPM instead of the site's TCTI (the device moved).
    pub fn load(dir: &Path) -> Result<Self, TpmError> {
        let path = dir.join(SITE_FILE);
        let bytes = std::fs::read(&path).map_err(|e| {
            TpmError::Config(format!(
                "cannot read {} ({e}): the TPM settings of the sealed keys in {} are missing",
                path.display(),
                dir.display()
            ))
        })?;
        let mut site: Self = serde_json::from_slice(&bytes).map_err(|e| {
            TpmError::Corrupt(format!("{} is not TPM settings: {e}", path.display()))
        })?;
        if let Ok(t) = std::env::var("GUESTKEY_TPM_TCTI") {
            if !t.is_empty() {
                site.tcti = t;
            }
        }
        Ok(site)
    }

    /// Writes the site into `dir` (atomically).
    pub fn save(&self, dir: &Path) -> Result<(), TpmError> {
        let text = serde_json::to_vec_pretty(self).expect("site serializes");
        crate::tpm::files::write_atomic(&dir.join(SITE_FILE), &text)
    }

    /// The protector of the sealed key `blob` of this site (in `dir`).
    pub fn protector(&self, dir: &Path, blob: &Path) -> TpmProtector {
        TpmProtector::new(
            blob,
            dir.join(APPROVALS_FILE),
            &self.tcti,
            &self.approve_hint,
        )
        .sealing_to(self.authority.clone(), self.pcrs.clone())
    }
}

/// The protector a `tpm:PATH` key source names: the site is read from
/// PATH's directory at each use, so errors name what is missing there.
#[derive(Debug, Clone)]
pub struct SiteProtector {
    blob: PathBuf,
}

impl SiteProtector {
    /// The sealed key at `blob`.
    pub fn new(blob: impl Into<PathBuf>) -> Self {
        Self { blob: blob.into() }
    }

    fn dir(&self) -> &Path {
        self.blob
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
    }

    fn inner(&self) -> Result<TpmProtector, ProtectError> {
        let dir = self.dir();
        Ok(TpmSite::load(dir)?.protector(dir, &self.blob))
    }
}

impl KeyProtector for SiteProtector {
    fn describe(&self) -> String {
        format!("tpm {}", self.blob.display())
    }
    fn exists(&self) -> Result<bool, ProtectError> {
        FileProtector::new(&self.blob, Encoding::Raw).exists()
    }
    fn create(&self, key: &ProtectedKey) -> Result<(), ProtectError> {
        self.inner()?.create(key)
    }
    fn replace(&self, key: &ProtectedKey) -> Result<(), ProtectError> {
        self.inner()?.replace(key)
    }
    fn unseal(&self) -> Result<ProtectedKey, ProtectError> {
        self.inner()?.unseal()
    }
}
