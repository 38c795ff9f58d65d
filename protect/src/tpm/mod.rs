//! TPM sealing of keys at rest, and TPM entropy.
//!
//! - [`TpmProtector`] is a [`guestkey_protect::KeyProtector`]: the key is
//!   kept in a file that only this machine's TPM can open, and only while
//!   the PCRs have values that the PCR authority approved.
//! - The sealed object's policy is TPM2_PolicyAuthorize naming the
//!   authority's public key ([`authority`]): it accepts any PCR policy the
//!   authority signed, so an update's new PCR values are approved with one
//!   signature in advance instead of re-sealing every key after the reboot
//!   (the lock-out that plain PolicyPCR causes after each firmware or kernel
//!   update).
//! - [`Entropy`] mixes TPM random bytes into every key the server or a host
//!   makes.
//!
//! Everything goes through `tss-esapi`, against `/dev/tpmrm0` or a
//! simulator (`swtpm`) by its TCTI string.

pub mod attest;
pub mod authority;
#[cfg(feature = "cli")]
pub mod cli;
mod device;
pub mod entropy;
mod files;
pub mod keyset;
mod marshal;
pub mod pcr;
mod protector;
mod service;
pub mod verify;

pub use authority::{Approval, Approvals, Authority, AuthorityPublic};
pub use device::Tpm;
pub use entropy::Entropy;
pub use files::write_atomic;
pub use keyset::{DEFAULT_TCTI, KeyEntry, KeySet, ResealReport, ResealTo, TpmTarget};
pub use pcr::{PcrSelection, PcrValue, PcrValues};
pub use protector::{
    APPROVALS_FILE, SITE_FILE, SealedStatus, SiteProtector, TpmProtector, TpmSite,
};
pub use service::{DEADLINE, with_tpm};

use crate::ProtectError;

/// The current values of `selection` on the TPM at `tcti`.
pub fn current_pcrs(tcti: &str, selection: &PcrSelection) -> Result<PcrValues, TpmError> {
    let sel = selection.clone();
    with_tpm(tcti, DEADLINE, move |t| t.pcr_values(&sel))
}

/// Why a TPM operation failed. Every message names the file or TCTI and,
/// where there is one, what to do; none contains key material.
#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    /// The TCTI or a setting is wrong.
    #[error("{0}")]
    Config(String),
    /// The TPM cannot be reached or does not answer.
    #[error("{0}")]
    Unreachable(String),
    /// The TPM is in dictionary-attack lockout.
    #[error("{0}")]
    Lockout(String),
    /// The sealed key belongs to another TPM, or this one was cleared.
    #[error("{0}")]
    OtherTpm(String),
    /// The PCRs do not have approved values.
    #[error("{0}")]
    PcrMismatch(String),
    /// An approval does not verify.
    #[error("{0}")]
    BadApproval(String),
    /// The PCR authority key is unusable.
    #[error("{0}")]
    Authority(String),
    /// A sealed-key or approvals file is damaged.
    #[error("{0}")]
    Corrupt(String),
    /// The TPM failed otherwise.
    #[error("{0}")]
    Device(String),
    /// A file could not be read or written.
    #[error("{0}")]
    Io(String),
    /// A key file could not be read or written.
    #[error(transparent)]
    Protect(#[from] ProtectError),
}

impl TpmError {
    /// The same error again (for every job that finds the TPM unopened).
    pub(crate) fn again(&self) -> Self {
        match self {
            Self::Config(m) => Self::Config(m.clone()),
            Self::Unreachable(m) => Self::Unreachable(m.clone()),
            Self::Lockout(m) => Self::Lockout(m.clone()),
            other => Self::Device(other.to_string()),
        }
    }
}

impl From<TpmError> for ProtectError {
    fn from(e: TpmError) -> Self {
        match e {
            TpmError::Protect(p) => p,
            other => ProtectError::Sealed(other.to_string()),
        }
    }
}
