//! Command-line flags shared by `guestkey-server` and `guestkeyd` (the
//! `cli` feature): where keys are sealed, and PCR values to approve.

use std::path::PathBuf;

use crate::tpm::keyset::{DEFAULT_TCTI, TpmTarget};
use crate::tpm::pcr::{PcrSelection, PcrValue};
use crate::tpm::protector::TpmSite;

/// Where keys are sealed.
#[derive(clap::Args, Debug)]
pub struct TpmFlags {
    /// The TPM [default: the current one, else device:/dev/tpmrm0].
    #[arg(long = "tpm-tcti", id = "tcti", value_name = "TCTI")]
    pub tcti: Option<String>,
    /// The PCRs the keys are bound to [default: the current ones, else
    /// sha256:7, the Secure Boot policy].
    #[arg(long = "tpm-pcrs", id = "pcrs", value_name = "PCRS")]
    pub pcrs: Option<PcrSelection>,
    /// The PCR authority's private key (made if missing): it signs the PCR
    /// values the keys may be unsealed with. Keep it off this machine.
    #[arg(long = "tpm-authority-key", id = "authority_key", value_name = "FILE")]
    pub authority_key: Option<PathBuf>,
}

impl TpmFlags {
    /// Whether no TPM flag was given.
    pub fn is_empty(&self) -> bool {
        self.tcti.is_none() && self.pcrs.is_none() && self.authority_key.is_none()
    }

    /// Where to seal (None when no flag was given), with the current site's TPM and PCRs as defaults.
    pub fn target(self, current: Option<&TpmSite>) -> Result<Option<TpmTarget>, String> {
        if self.is_empty() {
            return Ok(None);
        }
        let authority_key = self.authority_key.ok_or(
            "--tpm-authority-key FILE is needed: the PCR authority key (made there if missing)",
        )?;
        Ok(Some(TpmTarget {
            tcti: self
                .tcti
                .or_else(|| current.map(|s| s.tcti.clone()))
                .unwrap_or_else(|| DEFAULT_TCTI.to_owned()),
            pcrs: self
                .pcrs
                .or_else(|| current.map(|s| s.pcrs.clone()))
                .unwrap_or_else(PcrSelection::default_selection),
            authority_key,
        }))
    }
}

/// `N=SHA256`: a PCR and its value (for `--pcr`).
pub fn parse_pcr_value(s: &str) -> Result<(u8, PcrValue), String> {
    let (n, v) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not N=SHA256 (e.g. 7=3d45...)"))?;
    let n: u8 = n
        .trim()
        .parse()
        .ok()
        .filter(|n| *n < 24)
        .ok_or_else(|| format!("`{n}` is not a PCR number (0 to 23)"))?;
    Ok((n, v.parse()?))
}
