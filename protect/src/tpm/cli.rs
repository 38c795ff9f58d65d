//! Command-line flags shared by `guestkey-server` and `guestkeyd` (the
//! `cli` feature): where keys are sealed, PCR values to approve, and what
//! `tpm approve` and `tpm status` print.

use std::path::PathBuf;

use crate::tpm::TpmError;
use crate::tpm::keyset::{DEFAULT_TCTI, KeySet, ResealReport, ResealTo, TpmTarget};
use crate::tpm::pcr::{PcrSelection, PcrValue};
use crate::tpm::protector::{SealedStatus, TpmSite};

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

impl TpmFlags {
    /// Where `reseal` moves the keys: files with `to_files`, else the TPM
    /// these flags name (with `current`'s TPM and PCRs as defaults).
    pub fn reseal_to(self, to_files: bool, current: Option<&TpmSite>) -> Result<ResealTo, String> {
        if to_files {
            return Ok(ResealTo::Files);
        }
        self.target(current)?.map(ResealTo::Tpm).ok_or_else(|| {
            "name where the keys go: --to-files, or --tpm-authority-key FILE (with --tpm-tcti, --tpm-pcrs to change them)".to_owned()
        })
    }
}

/// What `reseal` prints.
pub fn resealed_text(r: &ResealReport) -> String {
    format!(
        "resealed {}: from {} to {}\n",
        r.keys.join(", "),
        r.from,
        r.to
    )
}

/// `tpm approve`'s flags, beside the directory flag each program names.
#[derive(clap::Args, Debug)]
pub struct ApproveFlags {
    /// The PCR authority's private key.
    #[arg(long, value_name = "FILE")]
    pub authority_key: PathBuf,
    /// Approve the current PCR values.
    #[arg(long, conflicts_with = "pcr")]
    pub current: bool,
    /// A PCR's value after the update: N=64 hex digits (repeat).
    #[arg(long, value_name = "N=SHA256", value_parser = parse_pcr_value)]
    pub pcr: Vec<(u8, PcrValue)>,
    /// What the approval is for (kept with it), e.g. "kernel 6.1.0-30".
    #[arg(long, default_value = "")]
    pub note: String,
}

impl ApproveFlags {
    /// Signs the values these flags name for the keys of `set`; returns
    /// what to print.
    pub fn approve(&self, set: &KeySet) -> Result<String, TpmError> {
        if !self.current && self.pcr.is_empty() {
            return Err(TpmError::Config(
                "name the values to approve: --current, or --pcr N=SHA256".into(),
            ));
        }
        let values = set.approve(&self.authority_key, &self.pcr, &self.note)?;
        let mut out = format!("approved for {}:\n", set.root().display());
        for (p, v) in values.iter() {
            out.push_str(&format!("  PCR {p:2} {v}\n"));
        }
        Ok(out)
    }
}

/// `tpm status` as `program` prints it.
pub fn status_text(s: &SealedStatus, program: &str) -> String {
    let mut out = format!(
        "sealed keys   {}\nTPM           {}\nPCRs          {}\nauthority     {}\napprovals     {}\nunseals now   {}\n",
        s.blob
            .parent()
            .map_or(String::new(), |p| p.display().to_string()),
        s.tcti,
        s.pcrs,
        s.authority,
        s.approvals,
        if s.unseals {
            "yes".to_owned()
        } else {
            format!("no: approve this boot's values with `{program} tpm approve`")
        }
    );
    for (p, v) in s.current.iter() {
        out.push_str(&format!("  PCR {p:2} {v}\n"));
    }
    out
}
